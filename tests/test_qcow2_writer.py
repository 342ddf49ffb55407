"""Images we write: QEMU must agree with us, byte for byte, with no leaks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.errors import UsageError
from engine.qcow2.check import check_image
from engine.qcow2.writer import Qcow2Writer

from tests.oracle import normalize_map, qemu_check, qemu_compare, qemu_img, qemu_io, qemu_map, qemu_raw

KiB = 1024
MiB = 1024 * 1024
CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 128 * KiB, 2 * MiB]


def _size_for(cs: int) -> int:
    """A size that is a multiple of 512 but not of the cluster size."""
    return 7 * cs + 512 if cs > 512 else 5000 * 512


def _random_writes(w: Qcow2Writer, expected: bytearray, rng: random.Random, count: int) -> None:
    cs = w.cluster_size
    nclusters = (w.size + cs - 1) // cs
    for _ in range(count):
        first = rng.randrange(nclusters)
        n = rng.randint(1, 4)
        start = first * cs
        end = min((first + n) * cs, w.size)
        if rng.random() < 0.2:
            w.write_zeroes(start, end - start)
            expected[start:end] = bytes(end - start)
        else:
            data = rng.randbytes(end - start)
            w.write(start, data)
            expected[start:end] = data


def _assert_qemu_agrees(image: Path, expected: bytes, tmp_path: Path) -> None:
    qemu_check(image)
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    qemu_compare(image, ref)
    assert check_image(str(image)).ok
    with ChainView.open(str(image)) as view:
        assert view.read(0, view.size) == expected
        assert normalize_map([m.as_json_dict() for m in view.map()]) == normalize_map(qemu_map(image))


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_standalone_image(cs: int, tmp_path: Path) -> None:
    size = _size_for(cs)
    expected = bytearray(size)
    img = tmp_path / "img.qcow2"
    with Qcow2Writer(str(img), size, cs) as w:
        _random_writes(w, expected, random.Random(cs), 40)
        last = (size - 1) // cs * cs  # the short last cluster
        w.write(last, b"\x5a" * (size - last))
        expected[last:] = b"\x5a" * (size - last)
        w.commit()
    _assert_qemu_agrees(img, bytes(expected), tmp_path)
    assert "cluster_size: %d" % cs in qemu_img("info", str(img))


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_image_with_backing_chain(cs: int, tmp_path: Path) -> None:
    size = _size_for(cs)
    # A base made by QEMU, full of data, with a different cluster size.
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k", str(base), str(size))
    qemu_io(base, f"write -P 0x33 0 {size}")
    expected = bytearray(qemu_raw(base, tmp_path))
    rng = random.Random(cs + 1)
    # Two layers of ours on top: the second backs onto the first.
    mid = tmp_path / "mid.qcow2"
    with Qcow2Writer(str(mid), size, cs, backing_file="base.qcow2", backing_format="qcow2") as w:
        _random_writes(w, expected, rng, 25)
        w.commit()
    top = tmp_path / "top.qcow2"
    with Qcow2Writer(str(top), size, cs, backing_file="mid.qcow2") as w:
        _random_writes(w, expected, rng, 25)
        w.write_zeroes(0, cs)  # hides base data: must read zeros, not fall through
        expected[0:cs] = bytes(cs)
        w.commit()
    for img in (mid, top):
        qemu_check(img)
    info = qemu_img("info", "--backing-chain", str(top))
    assert "backing file: mid.qcow2" in info and "backing file: base.qcow2" in info
    _assert_qemu_agrees(top, bytes(expected), tmp_path)


def test_backing_name_is_stored_relative(tmp_path: Path) -> None:
    """The chain keeps working after the whole directory moves."""
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    base = repo / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    qemu_io(base, "write -P 0x44 0 1M")
    top = repo / "sub" / "top.qcow2"
    with Qcow2Writer(str(top), MiB, 65536, backing_file="../base.qcow2") as w:
        w.write(0, b"\x01" * 65536)
        w.commit()
    moved = tmp_path / "moved"
    repo.rename(moved)
    top = moved / "sub" / "top.qcow2"
    assert "backing file: ../base.qcow2" in qemu_img("info", str(top))
    expected = b"\x01" * 65536 + b"\x44" * (MiB - 65536)
    assert qemu_raw(top, tmp_path) == expected
    with ChainView.open(str(top)) as view:
        assert view.read(0, MiB) == expected


def test_rewriting_a_cluster_leaks_nothing(tmp_path: Path) -> None:
    img = tmp_path / "rw.qcow2"
    with Qcow2Writer(str(img), 4 * MiB, 65536) as w:
        w.write(0, b"\x01" * 131072)
        w.write(65536, b"\x02" * 65536)  # in place
        w.write_zeroes(0, 65536)  # zero, allocated: keeps its host cluster
        w.write(0, b"\x03" * 65536)  # data again, same host cluster
        w.write_zeroes(1 * MiB, 32 * 65536)
        w.commit()
    expected = b"\x03" * 65536 + b"\x02" * 65536 + bytes(4 * MiB - 131072)
    _assert_qemu_agrees(img, expected, tmp_path)


def test_l2_tables_evicted_and_reloaded(tmp_path: Path) -> None:
    """A tiny L2 cache forces tables out to disk and back mid-write."""
    cs = 512
    size = 64 * MiB  # 2048 L2 tables of 64 entries
    img = tmp_path / "evict.qcow2"
    expected = bytearray(size)
    rng = random.Random(7)
    with Qcow2Writer(str(img), size, cs, l2_cache_bytes=4 * cs) as w:
        for _ in range(400):
            off = rng.randrange(size // cs) * cs
            data = rng.randbytes(cs)
            w.write(off, data)
            expected[off : off + cs] = data
        w.commit()
    _assert_qemu_agrees(img, bytes(expected), tmp_path)


def test_four_tib_virtual_size(tmp_path: Path) -> None:
    T = 1 << 40
    img = tmp_path / "big.qcow2"
    with Qcow2Writer(str(img), 4 * T, 65536) as w:
        w.write(0, b"\x11" * 65536)
        w.write(2 * T, b"\x22" * 131072)
        w.write(4 * T - 65536, b"\x33" * 65536)
        w.write_zeroes(3 * T, 65536)
        w.commit()
    qemu_check(img)
    assert "virtual size: 4 TiB" in qemu_img("info", str(img))
    qemu_io(img, "read -P 0x11 0 64k", f"read -P 0x22 {2 * T} 128k", f"read -P 0x33 {4 * T - 65536} 64k",
            f"read -P 0 {3 * T} 64k")
    assert normalize_map([m.as_json_dict() for m in ChainView.open(str(img)).map()]) == normalize_map(
        qemu_map(img)
    )


def test_sequential_writes_are_contiguous(tmp_path: Path) -> None:
    """A full backup written in order reads back with one extent per run."""
    img = tmp_path / "seq.qcow2"
    with Qcow2Writer(str(img), 64 * MiB, 65536) as w:
        for off in range(0, 32 * MiB, MiB):
            w.write(off, os.urandom(MiB))
        w.commit()
    with ChainView.open(str(img)) as view:
        data_extents = [m for m in view.map() if m.data]
        assert len(data_extents) == 1 and data_extents[0].length == 32 * MiB


def test_uncommitted_image_is_removed(tmp_path: Path) -> None:
    img = tmp_path / "gone.qcow2"
    with pytest.raises(RuntimeError):
        with Qcow2Writer(str(img), MiB, 65536) as w:
            w.write(0, b"\x01" * 65536)
            raise RuntimeError("job failed")
    assert not img.exists()
    w = Qcow2Writer(str(img), MiB, 65536)
    w.abort()
    assert not img.exists()


def test_header_is_written_last(tmp_path: Path) -> None:
    """Until commit, the file has no magic: a crash leaves nothing readable."""
    img = tmp_path / "partial.qcow2"
    w = Qcow2Writer(str(img), MiB, 65536)
    w.write(0, b"\x01" * 65536)
    assert img.read_bytes()[:4] == bytes(4)
    w.commit()
    assert img.read_bytes()[:4] == b"QFI\xfb"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=MiB, cluster_size=3000), "power of two"),
        (dict(size=MiB, cluster_size=256), "out of range"),
        (dict(size=MiB, cluster_size=4 * MiB), "out of range"),
        (dict(size=MiB + 100, cluster_size=65536), "multiple of 512"),
        (dict(size=4 << 40, cluster_size=512), "32 MiB"),
        (dict(size=MiB, cluster_size=512, backing_file="x" * 600), "more than one 512-byte cluster"),
        (dict(size=MiB, cluster_size=65536, backing_file="x" * 1024), "longer than 1023"),
    ],
)
def test_writer_refuses_bad_parameters(kwargs: dict, match: str, tmp_path: Path) -> None:
    img = tmp_path / "bad.qcow2"
    with pytest.raises(UsageError, match=match):
        Qcow2Writer(str(img), **kwargs)
    assert not img.exists()


def test_writer_refuses_misaligned_writes(tmp_path: Path) -> None:
    with Qcow2Writer(str(tmp_path / "m.qcow2"), MiB, 65536) as w:
        with pytest.raises(ValueError, match="aligned"):
            w.write(512, b"\x00" * 65536)
        with pytest.raises(ValueError, match="whole clusters"):
            w.write(0, b"\x00" * 1000)
        with pytest.raises(ValueError, match="outside"):
            w.write(MiB, b"\x00" * 65536)
