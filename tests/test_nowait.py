"""Reads that never wait: cached bytes inline, everything else a WouldBlock.

The mount serves a read on its event loop only when the page cache holds
it; a miss goes to a thread. A miss must never become an error: files on
file systems that cannot answer a nowait read (FUSE ones such as fuse2fs
say EOPNOTSUPP) are misses too, served by the waiting read.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import chain
from engine.chain import ChainView
from engine.nowait import WouldBlock
from engine.qcow2.writer import Qcow2Writer
from engine.repo import Repository

from tests.commands import sh
from tests.pagecache import drop_cached

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


@pytest.mark.mount
def test_files_that_cannot_answer_nowait_are_misses_not_errors(
    tmp_path: Path, fuse_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, data = _device(tmp_path, fuse_dir / "src.img")
    try:
        dev = repo.device("d")
        assert dev.read(0, MiB) == data[:MiB]
        with pytest.raises(WouldBlock):
            dev.read(0, MiB, nowait=True)
        # Its writes may wait on another process (or a network) for any
        # time: never on the mount's event loop, even whole cached pages.
        assert not dev.writes_inline
        with pytest.raises(WouldBlock):
            dev.write(0, b"W" * 4096, nowait=True)
        assert dev.write(0, b"W" * 4096) == 4096 and dev.read(0, 4096) == b"W" * 4096
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


# -- writes: inline only what cannot wait -------------------------------------------------


def test_device_writes_nowait_refuse_what_must_wait(tmp_path: Path) -> None:
    """Device.write(nowait=True) writes, or raises WouldBlock having written
    and marked nothing: partial pages not cached, a job starting or running."""
    src = tmp_path / "src.img"
    repo, data = _device(tmp_path, src)
    fd = os.open(src, os.O_RDONLY)
    try:
        dev = repo.device("d")
        assert dev.writes_inline  # a local file system: it answers nowait reads
        # Whole pages need no read, cached or not.
        drop_cached(fd, MiB, 64 * KiB)
        assert dev.write(MiB, b"A" * 8192, nowait=True) == 8192
        assert os.pread(fd, 8192, MiB) == b"A" * 8192
        assert dev.since_last.active.is_dirty(MiB, 1)
        # A partial page that is not cached would be read from disk first.
        # The probe's miss starts read-ahead, and on this machine's disk that
        # often completes before the kernel looks again (then the page is
        # cached and the write needs no disk): so each try is either
        # refused, having written and marked nothing, or finds the page
        # cached by the time it writes.
        def tries(offset: int, payload: bytes, page: int) -> None:
            for step in range(5):  # a page not probed before each time
                offset, page = offset + step * 64 * KiB, page + step * 64 * KiB
                before = os.pread(fd, len(payload), offset)
                was_dirty = dev.since_last.active.is_dirty(page, 1)
                drop_cached(fd, page, 4 * KiB)  # after our own look at it
                try:
                    dev.write(offset, payload, nowait=True)
                except WouldBlock:
                    assert os.pread(fd, len(payload), offset) == before
                    assert dev.since_last.active.is_dirty(page, 1) == was_dirty
                else:
                    assert os.pread(fd, len(payload), offset) == payload
                    assert dev.since_last.active.is_dirty(page, 1)

        tries(2 * MiB + 100, b"B" * 512, 2 * MiB)
        tries(3 * MiB - 4096, b"B" * 4196, 3 * MiB)  # a partial last page
        dev.read(2 * MiB, 4096)  # now cached: inline it goes
        assert dev.write(2 * MiB + 100, b"B" * 512, nowait=True) == 512
        assert os.pread(fd, 512, 2 * MiB + 100) == b"B" * 512
        # A job starting or ending holds the gate: no waiting for it inline.
        with dev.gate.exclusive():
            with pytest.raises(WouldBlock):
                dev.write(MiB, b"C" * 4096, nowait=True)
        assert os.pread(fd, 4096, MiB) == b"A" * 4096
    finally:
        os.close(fd)
        repo.close()


def test_device_writes_during_a_job_go_to_copy_before_write(tmp_path: Path) -> None:
    """While a backup runs, a nowait write is refused (copy-before-write may
    read and write MiBs); the waiting write saves the old bytes first."""
    import threading

    from engine.job import CancelRequest, JobCancelled

    src = tmp_path / "src.img"
    repo, data = _device(tmp_path, src)
    try:
        repo.backup("d", "full")
        dev = repo.device("d")
        for off in range(0, 4 * MiB, MiB):  # the whole device dirty: the incremental has it all to do
            dev.write(off, data[off : off + MiB])
        cancel = CancelRequest()
        results: list[object] = []

        def run() -> None:
            try:
                results.append(repo.backup("d", "incremental", rate=1024 * 1024, cancel=cancel, chunk_bytes=MiB))
            except JobCancelled as e:
                results.append(e)

        job = threading.Thread(target=run)
        job.start()
        try:
            while dev.job is None or dev.job.progress.done == 0:
                assert job.is_alive(), results
            with pytest.raises(WouldBlock):
                dev.write(3 * MiB, b"D" * 4096, nowait=True)
            assert dev.write(3 * MiB, b"D" * 4096) == 4096  # waits for copy-before-write
            assert dev.job is not None and dev.job.cbw_units >= 1
        finally:
            cancel.cancel("the test is done")
            job.join(timeout=60)
        assert not job.is_alive() and isinstance(results[0], JobCancelled)
    finally:
        repo.close()


@pytest.mark.mount
def test_device_writes_through_the_mount_are_served_in_c_and_land(tmp_path: Path) -> None:
    """Whole-page writes, and a partial page just dropped from the cache (it
    must be read from disk first), are served by the relay's C threads (the
    log counts them; the loop never waits for the disk on them); every byte
    lands."""
    from tests.mounts import mounted_device

    data = bytearray(random.Random(5).randbytes(4 * MiB))
    with mounted_device(tmp_path, data, "d") as m:
        src = m.src  # type: ignore[attr-defined]
        dev = m.path("d", "device")
        patch = random.Random(6).randbytes(MiB)
        (tmp_path / "patch").write_bytes(patch)
        sh(f"dd if={tmp_path / 'patch'} of={dev} bs=4k seek=256 conv=notrunc status=none")
        data[MiB : 2 * MiB] = patch
        fd = os.open(src, os.O_RDONLY)
        try:
            drop_cached(fd, 3 * MiB, 4 * KiB)
        finally:
            os.close(fd)
        sh(f"printf 'partial page' | dd of={dev} bs=1 seek={3 * MiB + 100} conv=notrunc status=none")
        data[3 * MiB + 100 : 3 * MiB + 112] = b"partial page"
        (tmp_path / "expected").write_bytes(data)
        sh(f"cmp {dev} {tmp_path / 'expected'}")
        m.stop()
    sh(f"cmp {src} {tmp_path / 'expected'}")
    served = re.findall(r"relay: (\d+) device requests served in C", m.log())
    assert served, m.log()
    assert int(served[-1]) >= 256 + 12, served  # dd's 4k writes and printf's 12 bytes (and cmp's reads)
    assert not re.findall(r"device d: \d+ writes inline", m.log())  # none came to Python
