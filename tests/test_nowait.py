"""Reads that never wait: cached bytes inline, everything else a WouldBlock.

The mount serves a read on its event loop only when the page cache holds
it; a miss goes to a thread. A miss must never become an error: files on
file systems that cannot answer a nowait read (FUSE ones such as fuse2fs
say EOPNOTSUPP) are misses too, served by the waiting read.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import chain
from engine.chain import ChainView
from engine.nowait import WouldBlock
from engine.qcow2.writer import Qcow2Writer
from engine.repo import Repository

from conftest import drop_cached, sh

KiB = 1024
MiB = 1024 * KiB


def _device(tmp_path: Path, source: Path) -> tuple[Repository, bytes]:
    data = random.Random(3).randbytes(4 * MiB)
    with open(source, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped from the cache
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    repo.add_device("d", str(source), 64 * KiB)
    return repo, data


def test_device_reads_inline_what_is_cached_and_says_when_not(tmp_path: Path) -> None:
    repo, data = _device(tmp_path, tmp_path / "src.img")
    try:
        dev = repo.device("d")
        assert dev.read(MiB, MiB) == data[MiB : 2 * MiB]  # now cached
        into = bytearray(MiB)
        got = dev.read(MiB, MiB, nowait=True, into=into)
        assert got is into and got == data[MiB : 2 * MiB]
        # Clipped at the device's end; a buffer of the wrong length is not used.
        tail = dev.read(4 * MiB - 100, 4096, nowait=True, into=bytearray(4096))
        assert bytes(tail) == data[-100:]

        fd = os.open(tmp_path / "src.img", os.O_RDONLY)
        try:
            # As in test_chain_index: a miss starts read-ahead, which a fast
            # disk may finish before the next look; some try must miss.
            blocked = 0
            for _ in range(5):
                drop_cached(fd, 2 * MiB, MiB)
                try:
                    got = dev.read(2 * MiB, MiB, nowait=True)
                except WouldBlock:
                    blocked += 1
                else:
                    assert got == data[2 * MiB : 3 * MiB]
            assert blocked, "nowait reads of uncached data never said WouldBlock"
            drop_cached(fd, 2 * MiB, MiB)
        finally:
            os.close(fd)
        assert dev.read(2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    finally:
        repo.close()


@pytest.fixture
def fuse_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on fuse2fs: a file system whose files refuse RWF_NOWAIT."""
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    sh(f"mkfs.ext4 -q -F {image}")
    mnt = tmp_path / "fuse2fs"
    mnt.mkdir()
    sh(f"fuse2fs {image} {mnt} -o fakeroot")
    try:
        yield mnt
    finally:
        sh(f"fusermount3 -u {mnt}")


def test_files_that_cannot_answer_nowait_are_misses_not_errors(
    tmp_path: Path, fuse_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, data = _device(tmp_path, fuse_dir / "src.img")
    try:
        dev = repo.device("d")
        assert dev.read(0, MiB) == data[:MiB]
        with pytest.raises(WouldBlock):
            dev.read(0, MiB, nowait=True)
    finally:
        repo.close()

    image = fuse_dir / "tip.qcow2"
    with Qcow2Writer(str(image), 4 * MiB, 64 * KiB) as w:
        w.write(0, data[: 2 * MiB])
        w.commit()
    for loop in ("c", "python"):
        if loop == "python":
            monkeypatch.setattr(chain, "_fastread", None)
        with ChainView.open(str(image)) as view:
            assert view.read(0, MiB) == data[:MiB]
            with pytest.raises(WouldBlock):
                view.read(0, MiB, nowait=True)
