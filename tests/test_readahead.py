"""Read-ahead advice follows the disk's own read-ahead, on a real loop-mounted ext4."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import chain
from engine.chain import ChainView
from engine.qcow2.writer import Qcow2Writer
from engine.readahead import kernel_read_ahead

from conftest import sh

MiB = 1024 * 1024


@pytest.fixture
def loop_fs(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(mounted directory, /sys/block/loopN/queue/read_ahead_kb) of a fresh ext4."""
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(96 * MiB)
    sh(f"mkfs.ext4 -q -F {backing}")
    loop = sh(f"losetup -f --show {backing}").stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh(f"mount {loop} {mnt}")
        try:
            yield mnt, f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb"
        finally:
            sh(f"umount {mnt}")
    finally:
        sh(f"losetup -d {loop}")


def _set(knob: str, kib: int) -> None:
    with open(knob, "w") as f:
        f.write(str(kib))


def test_read_ahead_is_read_from_the_disk_each_time(loop_fs: tuple[Path, str], tmp_path: Path) -> None:
    mnt, knob = loop_fs
    (mnt / "f").write_bytes(b"x")
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        _set(knob, 8192)
        assert kernel_read_ahead(fd) == 8 * MiB
        _set(knob, 128)
        assert kernel_read_ahead(fd) == 128 * 1024  # retuned: seen at once
    finally:
        os.close(fd)
    shm = os.open("/dev/shm", os.O_RDONLY)
    try:
        assert kernel_read_ahead(shm) is None  # tmpfs: no block device behind it
    finally:
        os.close(shm)


def test_advice_leaves_sequential_pieces_to_a_large_read_ahead(
    loop_fs: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full under one small incremental: the full's pieces of a window are in
    file order; with the disk reading 8 MiB ahead by itself only the
    incremental's pieces get advice, with 128 KiB every piece does."""
    mnt, knob = loop_fs
    cs = 64 * 1024
    full = mnt / "full.qcow2"
    with Qcow2Writer(str(full), 32 * MiB, cs) as w:
        w.write(0, os.urandom(32 * MiB))
        w.commit()
    inc = mnt / "inc.qcow2"
    with Qcow2Writer(str(inc), 32 * MiB, cs, backing_file="full.qcow2", backing_format="qcow2") as w:
        for k in (3, 40, 41, 200):
            w.write(k * cs, os.urandom(cs))
        w.commit()

    def advised(kib: int) -> dict[str, int]:
        _set(knob, kib)
        calls: list[tuple[int, int, int]] = []
        monkeypatch.setattr(chain, "_willneed", lambda fd, off, n: calls.append((fd, off, n)))
        with ChainView.open(str(inc)) as view:
            names = {layer.fd: os.path.basename(layer.path) for layer in view.layers}
            view.advise(0, 16 * MiB)
            out: dict[str, int] = {}
            for fd, _off, n in calls:
                out[names[fd]] = out.get(names[fd], 0) + n
            # What is advised is what the window needs, nothing more.
            assert sum(out.values()) <= 16 * MiB
            return out

    large = advised(8192)
    assert large == {"inc.qcow2": 4 * cs}  # clusters 3, 40, 41, 200 lie in the first 16 MiB
    small = advised(128)
    assert small["inc.qcow2"] == 4 * cs
    assert small["full.qcow2"] == 16 * MiB - 4 * cs
