"""Reused read buffers: never handed out while anyone still holds one, and reads fill them whole."""

from __future__ import annotations

import os
from pathlib import Path

from backupfs.readbuffers import ReadBuffers
from engine.chain import ChainView
from engine.qcow2.writer import Qcow2Writer

MiB = 1024 * 1024


def test_a_held_buffer_is_not_handed_out_again() -> None:
    pool = ReadBuffers(MiB, 2)
    a = pool.take(MiB)
    assert a is not None and len(a) == MiB
    b = pool.take(MiB)
    assert b is not None and b is not a  # a is still held here
    assert pool.take(MiB) is None  # both held, the pool is full
    view = memoryview(a)[10:20]  # a slice of a reply keeps its buffer busy
    del a
    assert pool.take(MiB) is None
    del view, b
    again = pool.take(MiB)
    assert again is not None
    assert pool.take(4096) is None  # other sizes are not pooled


def test_a_reused_buffer_is_overwritten_everywhere(tmp_path: Path) -> None:
    """Holes and zero clusters in the second read must not show the first read's bytes."""
    path = tmp_path / "img.qcow2"
    data = os.urandom(MiB)
    with Qcow2Writer(str(path), 4 * MiB, 65536) as w:
        w.write(0, data)
        w.write_zeroes(2 * MiB, 64 * 1024)
        w.commit()
    pool = ReadBuffers(MiB, 1)
    with ChainView.open(str(path)) as view:
        first = view.read(0, MiB, into=pool.take(MiB))
        assert first == data
        del first
        buf = pool.take(MiB)
        assert buf is not None and buf == data  # the same buffer, still holding the data
        second = view.read(2 * MiB, MiB, into=buf)
        assert second is buf
        assert second == bytes(MiB)  # zero cluster then unallocated: all zeros now
