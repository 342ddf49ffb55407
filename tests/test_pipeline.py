"""engine.pipeline: reads run ahead of writes, in order, and a failure on either side stops both."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest

from engine.pipeline import copy_chunks
from engine.restore import RestoreError, Target, restore_to

CHUNK = 64 * 1024
WAIT = 30.0  # bound on an event wait, so a broken pipeline fails instead of hanging


def _chunks(size: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    return [(pos, min(chunk, size - pos)) for pos in range(0, size, chunk)]


def test_every_chunk_arrives_in_order_with_its_bytes() -> None:
    source = os.urandom(10 * CHUNK + 123)
    out = bytearray(len(source))
    order: list[int] = []

    def read(pos: int, buf: memoryview) -> memoryview:
        buf[:] = source[pos : pos + len(buf)]
        return buf

    def write(pos: int, data: memoryview) -> None:
        order.append(pos)
        out[pos : pos + len(data)] = data

    copy_chunks(_chunks(len(source)), read, write, CHUNK)
    assert bytes(out) == source
    assert order == [pos for pos, _ in _chunks(len(source))]


def test_the_next_read_runs_while_a_write_is_under_way() -> None:
    # The write of chunk 0 waits for the read of chunk 1: one after the
    # other, that read would never come.
    second_read = threading.Event()

    def read(pos: int, buf: memoryview) -> memoryview:
        if pos == CHUNK:
            second_read.set()
        return buf

    def write(pos: int, data: memoryview) -> None:
        if pos == 0:
            assert second_read.wait(WAIT), "the reader did not run ahead of the writer"

    copy_chunks(_chunks(4 * CHUNK), read, write, CHUNK)


def test_a_failed_read_stops_after_the_chunks_before_it() -> None:
    written: list[int] = []

    def read(pos: int, buf: memoryview) -> memoryview:
        if pos == 3 * CHUNK:
            raise OSError(errno.EIO, "Input/output error")
        return buf

    with pytest.raises(OSError) as info:
        copy_chunks(_chunks(8 * CHUNK), read, lambda pos, _data: written.append(pos), CHUNK)
    assert info.value.errno == errno.EIO
    assert written == [0, CHUNK, 2 * CHUNK]
    assert not [t for t in threading.enumerate() if t.name == "backupfs-copy-reader"]


def test_a_failed_write_stops_the_reader() -> None:
    reads: list[int] = []

    def read(pos: int, buf: memoryview) -> memoryview:
        reads.append(pos)
        return buf

    def write(pos: int, data: memoryview) -> None:
        if pos == CHUNK:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        copy_chunks(_chunks(100 * CHUNK), read, write, CHUNK, buffers=3)
    # It read at most its buffers' worth past the failed write, not the rest of the disk.
    assert len(reads) <= 2 + 3
    assert not [t for t in threading.enumerate() if t.name == "backupfs-copy-reader"]


def test_a_chunk_larger_than_the_buffers_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        copy_chunks([(0, CHUNK + 1)], lambda _p, b: b, lambda _p, _d: None, CHUNK)


def test_a_failed_restore_in_place_says_what_it_left(tmp_path: Path) -> None:
    """In place (a block device, the mounted device file) a failure cannot
    leave the old contents: the error said only what failed."""
    target = tmp_path / "disk.raw"
    target.write_bytes(b"\x02" * (32 * 1024 * 1024))

    def read(pos: int, buf: memoryview) -> memoryview:
        if pos >= 16 * 1024 * 1024:
            raise OSError(errno.EIO, "Input/output error")
        buf[:] = b"\x01" * len(buf)
        return buf

    with pytest.raises(RestoreError, match=f"at offset 16777216: Input/output error; {target} now holds the "
                                           "backup's first 16 MiB and its old contents after that"):
        restore_to(read, 32 * 1024 * 1024, str(target), kind=Target.IN_PLACE)
    data = target.read_bytes()
    assert data[: 16 * 1024 * 1024] == b"\x01" * (16 * 1024 * 1024) and data[-1:] == b"\x02"


def test_a_killed_restore_s_copy_is_removed_by_the_next(tmp_path: Path) -> None:
    """A restore killed outright (SIGKILL, OOM, power cut) left its hidden
    copy beside the target, up to the disk's size, for good. The next restore
    to that target removes it; a copy a live restore holds stays."""
    target = tmp_path / "out.raw"
    stale = tmp_path / ".out.raw.k1ll3d__.restoring"
    stale.write_bytes(b"\x07" * 4096)
    live = tmp_path / ".out.raw.l1v3____.restoring"
    live.write_bytes(b"")
    other = tmp_path / ".other.raw.k1ll3d__.restoring"  # another target's: not ours to judge
    other.write_bytes(b"")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        restore_to(lambda _p, buf: buf, 1024 * 1024, str(target), kind=Target.FILE)
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, target.name])


def test_restore_names_a_read_error_as_one(tmp_path: Path) -> None:
    target = tmp_path / "out.raw"

    def read(pos: int, buf: memoryview) -> memoryview:
        if pos > 0:
            raise OSError(errno.EIO, "Input/output error")
        buf[:] = b"\x01" * len(buf)
        return buf

    with pytest.raises(RestoreError, match="reading the backup at offset 8388608: Input/output error"):
        restore_to(read, 32 * 1024 * 1024, str(target), kind=Target.FILE)
    assert not target.exists()  # a failed restore leaves no half-written file behind
