"""The C read loop (engine/_fastread.c) where it differs from plain reads.

The byte-for-byte checks against QEMU run for both loops through the
``read_loop`` fixture (test_qcow2_read_oracle, test_chain_index); these
are the edges: a short file, and arguments the loop must refuse rather
than read out of bounds with.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import pytest

from engine.chain import ChainView, WouldBlock
from engine.qcow2.writer import Qcow2Writer

from tests.oracle import qemu_img, qemu_io

CLUSTER = 65536


def _image(path: Path, data: bytes) -> None:
    with Qcow2Writer(str(path), 4 * CLUSTER, CLUSTER) as w:
        w.write(0, data)
        w.commit()


def test_a_truncated_layer_reads_zeros_past_its_end(tmp_path: Path, read_loop: str) -> None:
    """A damaged image whose last data cluster is cut short: the missing
    bytes read as zeros (QEMU does the same), in both loops alike."""
    path = tmp_path / "cut.qcow2"
    raw = tmp_path / "data.raw"
    data = os.urandom(2 * CLUSTER)
    raw.write_bytes(data)
    qemu_img("create", "-f", "qcow2", str(path), str(4 * CLUSTER))
    qemu_io(path, f"write -s {raw} 0 {2 * CLUSTER}")  # QEMU puts data after its tables
    with ChainView.open(str(path)) as view:
        host = view._hosts[view._starts.index(0)]
    assert host + 2 * CLUSTER == path.stat().st_size
    cut = 1000
    os.truncate(path, host + CLUSTER + cut)  # keeps 1000 bytes of the second cluster
    with ChainView.open(str(path)) as view:
        got = view.read(0, 2 * CLUSTER)
        assert got[: CLUSTER + cut] == data[: CLUSTER + cut]
        assert got[CLUSTER + cut :] == bytes(CLUSTER - cut)
        buf = bytearray(b"\xee" * (2 * CLUSTER))
        view.readinto(0, memoryview(buf))
        assert buf == got
        with pytest.raises(WouldBlock):  # a short read is left to the waiting path
            view.read(CLUSTER, CLUSTER, nowait=True)


def test_the_loop_refuses_arrays_that_disagree(tmp_path: Path) -> None:
    from engine import _fastread

    path = tmp_path / "a.qcow2"
    _image(path, os.urandom(CLUSTER))
    with ChainView.open(str(path)) as view:
        out = bytearray(CLUSTER)
        args = [view._starts, view._hosts, view._kinds, view._depths, view._fd_array]
        assert _fastread.fill(out, 0, *args, view.size, 0) == CLUSTER
        assert out == view.read(0, CLUSTER)
        with pytest.raises(ValueError, match="disagree"):
            _fastread.fill(out, 0, array("Q", list(view._starts) + [1 << 40]), *args[1:], view.size, 0)
        with pytest.raises(ValueError, match="outside the disk"):
            _fastread.fill(out, view.size - 10, *args, view.size, 0)
        with pytest.raises(ValueError, match="layer"):
            _fastread.fill(out, 0, *args[:4], array("i"), view.size, 0)
        with pytest.raises(TypeError):
            _fastread.fill(bytes(CLUSTER), 0, *args, view.size, 0)  # not writable


def test_an_empty_disk_reads_nothing(tmp_path: Path, read_loop: str) -> None:
    path = tmp_path / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "0")
    with ChainView.open(str(path)) as view:
        assert view.size == 0
        assert view.read(0, 4096) == b""
        view.readinto(0, memoryview(bytearray()))


def test_the_advice_loop_refuses_an_index_out_of_order(tmp_path: Path) -> None:
    """Extents whose starts do not ascend (no index we build, but the loop
    must not write past its run table on one): an error, nothing advised."""
    from engine import _fastread

    path = tmp_path / "a.qcow2"
    _image(path, os.urandom(4 * CLUSTER))
    with ChainView.open(str(path)) as view:
        n = 8
        starts = array("Q", [3500, 50, 60, 70, 80, 90, 100, 110])
        hosts = array("Q", [0] * n)
        kinds = bytes([_fastread.DATA] * n)
        depths = array("H", [0] * n)
        with pytest.raises(ValueError, match="not in disk order"):
            _fastread.advise(0, 3000, starts, hosts, kinds, depths, view._fd_array, view.size,
                             view._streaming_mask, 1 << 20, True)
        with pytest.raises(ValueError, match="names a layer"):
            _fastread.advise(0, view.size, view._starts, view._hosts, view._kinds,
                             array("H", [5] * len(view._depths)), view._fd_array, view.size,
                             view._streaming_mask, 1 << 20, False)
        assert _fastread.advise(0, view.size, view._starts, view._hosts, view._kinds, view._depths,
                                view._fd_array, view.size, view._streaming_mask, 1 << 20, False) >= 0
