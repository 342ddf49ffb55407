"""A device's C read/write path (engine/_devio.c) and what it shares with Python.

The mount's relay threads call the same functions as ``serve_write`` /
``serve_read`` here: a plain write marks both bitmaps and lands; anything
else is declined (-1 / None) for Python to serve with its rules.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitarray import bitarray

from engine.catalog import DeviceRecord
from engine.devio import PythonDeviceIO, new_device_io

devio = pytest.importorskip("engine._devio", reason="the C extension is part of every build the suite runs")

G = 64 * 1024
SIZE = 64 * G


def bits(n: int = SIZE // G) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    return b


@pytest.fixture
def source(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"")
    os.truncate(path, SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def opened(fd: int) -> tuple[object, bitarray, bitarray]:
    io = devio.DevIO(fd, SIZE, G, os.fstat(fd).st_mtime_ns)
    last, full = bits(), bits()
    io.set_bitmaps(last, full)
    io.set_writes(True)
    io.unblock()
    return io, last, full


def test_a_write_marks_both_bitmaps_then_lands(source: int) -> None:
    io, last, full = opened(source)
    assert io.serve_write(3 * G + 100, b"y" * G) == G  # crosses into granule 4
    assert list(last.search(1)) == list(full.search(1)) == [3, 4]
    assert os.pread(source, G, 3 * G + 100) == b"y" * G
    assert io.serve_read(3 * G + 100, 4) == b"yyyy"
    assert io.serve_write(SIZE - 10, b"z" * 100) == 10  # clipped at the end, as Device.write
    assert io.serve_read(SIZE - 4, 100) == b"zzzz"
    assert io.serve_read(SIZE, 10) == b""
    assert io.stats()[:2] == (2, 2)  # reads and writes served; the read at the end needs none


def test_it_starts_blocked_and_declines_while_blocked_or_writes_are_off(source: int) -> None:
    io = devio.DevIO(source, SIZE, G, os.fstat(source).st_mtime_ns)
    assert io.serve_write(0, b"x") == -1 and io.serve_read(0, 1) is None
    io, last, _ = opened(source)
    with pytest.raises(RuntimeError):
        io.set_bitmaps(bits(), bits())  # only while blocked: a writer in C may be marking
    io.block()
    assert io.serve_write(0, b"x") == -1 and io.serve_read(0, 1) is None
    with pytest.raises(ValueError):
        io.set_bitmaps(bits()[:8], bits())  # too small for the device
    io.unblock()
    io.set_writes(False)  # a job runs: copy-before-write is Python's
    assert io.serve_write(0, b"x") == -1
    assert io.serve_read(0, 1) == b"\0"  # reads do not care about jobs
    assert not last.any() and os.pread(source, 1, 0) == b"\0"
    with pytest.raises(RuntimeError):
        io.unblock()  # not blocked


def test_a_source_cut_short_or_written_by_another_program_is_declined(source: int) -> None:
    io, last, _ = opened(source)
    os.ftruncate(source, SIZE - G)
    assert io.serve_write(SIZE - 2 * G, b"x" * (2 * G)) == -1  # would grow it around a hole
    assert io.serve_read(SIZE - 2 * G, 2 * G) is None  # ends early: Python says it was cut
    os.ftruncate(source, SIZE)
    os.utime(source, ns=(0, os.fstat(source).st_mtime_ns + 10**9))  # another program's write
    assert io.serve_write(0, b"x") == -1
    # Python notices it (and distrusts); from then on the time is ours again.
    st = os.fstat(source)
    assert io.note_outside(st.st_mtime_ns, True, True)
    assert io.serve_write(0, b"x") == 1


@pytest.mark.parametrize("impl", ["c", "python"])
def test_the_outside_write_test_counts_writes_of_either_path(source: int, impl: str) -> None:
    t0 = os.fstat(source).st_mtime_ns
    io = (devio.DevIO if impl == "c" else PythonDeviceIO)(source, SIZE, G, t0)
    assert not io.note_outside(t0, True, False)
    assert not io.note_outside(t0 + 5, False, False)  # a block device's time says nothing
    assert not io.note_outside(t0 - 5, True, True)  # older than ours: not news
    io.begin_write()
    assert not io.note_outside(t0 + 5, True, False)  # ours in flight moves it too
    io.end_write(t0 + 7)
    assert io.seen_mtime_ns == t0 + 7
    assert io.note_outside(t0 + 9, True, True, True)
    assert io.seen_mtime_ns == t0 + 9
    assert not io.note_outside(t0 + 20, True, True)  # the begin above is still in flight
    io.end_write(0)
    assert io.seen_mtime_ns == t0 + 9


def test_marks_from_many_threads_and_from_python_lose_no_bit(source: int) -> None:
    """Granules share bytes: eight threads writing neighbours through C while
    Python marks the others (as Device.write does) must leave every bit set."""
    io, last, full = opened(source)

    def writer(k: int) -> None:
        for g in range(k, SIZE // G, 16):
            assert io.serve_write(g * G, b"w") == 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for g in range(8, SIZE // G, 16):
        for k in range(8):
            io.mark((g + k) * G, 1)
    for t in threads:
        t.join()
    assert last.all() and full.all()


def test_new_device_io_is_the_c_one_when_built(source: int) -> None:
    assert isinstance(new_device_io(source, SIZE, G, 0), devio.DevIO)


class StubJob:
    def cancel(self, reason: str) -> None:
        pass


def test_a_device_hands_c_its_active_bitmaps_and_takes_writes_back_for_a_job(tmp_path: Path) -> None:
    """Device wires it: freezing a bitmap for a job swaps the buffers C marks
    (under the gate), and while the job is set C declines every write."""
    from engine.device import Device

    src = tmp_path / "d.raw"
    src.write_bytes(b"")
    os.truncate(src, SIZE)
    state = tmp_path / "state"
    state.mkdir()
    dev = Device(DeviceRecord(name="d", source=str(src), size=SIZE, granularity=G, created_ns=0), str(state), has_backups=False)
    try:
        assert dev.io.serve_write(0, b"a") == 1
        with dev.gate.exclusive():
            assert dev.io.serve_write(G, b"b") == -1  # blocked while the gate is held
            frozen = dev.since_last.freeze()
            dev.job = StubJob()  # type: ignore[assignment]  # any job: C must leave writes to Python
        assert list(frozen.bits.search(1)) == [0]
        assert dev.io.serve_write(2 * G, b"c") == -1
        with dev.gate.exclusive():
            dev.job = None
            dev.since_last.reclaim()
        assert dev.io.serve_write(3 * G, b"d") == 1
        assert list(dev.since_last.active.bits.search(1)) == [0, 3]  # the new active one, with the reclaimed bit
    finally:
        dev.close()
