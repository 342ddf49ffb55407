"""Reading what QEMU writes: our bytes and our map must equal QEMU's.

Each scenario builds a chain with qemu-img/qemu-io only; the assertions
compare ChainView against `qemu-img convert -O raw` (every byte, plus
random partial reads) and `qemu-img map --output=json`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.qcow2.check import check_image

from tests.oracle import normalize_map, qemu_img, qemu_io, qemu_map, qemu_raw

KiB = 1024
MiB = 1024 * 1024

Builder = Callable[[Path], Path]
SCENARIOS: dict[str, Builder] = {}


def scenario(fn: Builder) -> Builder:
    SCENARIOS[fn.__name__] = fn
    return fn


def create(path: Path, size: str | int, *opts: str, backing: Path | str | None = None, fmt: str = "qcow2") -> Path:
    args = ["create", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", str(backing), "-F", fmt]
    qemu_img(*args, str(path), str(size))
    return path


@scenario
def plain_data_zero_discard(d: Path) -> Path:
    img = create(d / "a.qcow2", "4M")
    qemu_io(
        img,
        "write -P 0x11 0 64k",
        "write -P 0x12 100k 3000",  # unaligned: QEMU allocates the whole cluster
        "write -z 512k 128k",
        "write -P 0x13 1M 1M",
        "discard 1M 64k",
        "write -P 0x14 4032k 64k",
    )
    return img


@scenario
def zero_flag_hides_backing(d: Path) -> Path:
    base = create(d / "base.qcow2", "2M")
    qemu_io(base, "write -P 0x21 0 2M")
    top = create(d / "top.qcow2", "2M", backing="base.qcow2")
    qemu_io(top, "write -z 64k 64k", "write -z 256k 4k", "write -P 0x22 1M 4k", "write -z -u 1536k 128k")
    return top


@scenario
def compressed_zlib(d: Path) -> Path:
    img = create(d / "z.qcow2", "1M")
    qemu_io(img, "write -c -P 0x31 0 64k", "write -c -P 0x32 128k 64k", "write -P 0x33 256k 64k")
    return img


@scenario
def compressed_zstd_small_clusters(d: Path) -> Path:
    img = create(d / "zs.qcow2", "1M", "compression_type=zstd", "cluster_size=4096")
    qemu_io(img, *[f"write -c -P {0x40 + i} {i * 8}k 4k" for i in range(20)], "write -P 0x7f 400k 4k")
    return img


def _text_and_random(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += b"backupfs compresses text well. " * rng.randint(100, 3000)
        elif rng.random() < 0.5:
            out += bytes(rng.randint(4096, 200_000))
        else:
            out += rng.randbytes(rng.randint(1000, 100_000))
    path.write_bytes(bytes(out[:size]))
    return path


@scenario
def convert_compressed_zlib(d: Path) -> Path:
    raw = _text_and_random(d / "src.raw", 3 * MiB, 1)
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=16k", str(raw), str(d / "cz.qcow2"))
    return d / "cz.qcow2"


@scenario
def convert_compressed_zstd(d: Path) -> Path:
    raw = _text_and_random(d / "src.raw", 3 * MiB, 2)
    qemu_img(
        "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), str(d / "czs.qcow2")
    )
    return d / "czs.qcow2"


@scenario
def extended_l2_subclusters(d: Path) -> Path:
    base = create(d / "base.qcow2", "2M", "cluster_size=64k")
    qemu_io(base, "write -P 0x51 0 2M")
    top = create(d / "top.qcow2", "2M", "extended_l2=on", "cluster_size=64k", backing="base.qcow2")
    qemu_io(
        top,
        "write -P 0x52 0 2k",  # one subcluster (2 KiB) allocated
        "write -P 0x53 6k 4k",  # two subclusters, rest falls through
        "write -z 64k 8k",  # zero subclusters over backing data
        "write -P 0x54 128k 64k",
        "discard 128k 16k",
        "write -c -P 0x55 256k 64k",
        "write -z 512k 64k",
    )
    return top


@scenario
def extended_l2_large_clusters(d: Path) -> Path:
    img = create(d / "x.qcow2", "3M", "extended_l2=on", "cluster_size=128k")
    qemu_io(img, "write -P 0x56 4k 4k", "write -P 0x57 130k 100k", "write -z 1M 4k", "write -P 0x58 1028k 4k")
    return img


@scenario
def compat_010_chain(d: Path) -> Path:
    base = create(d / "v2base.qcow2", "2M", "compat=0.10", "cluster_size=4k")
    qemu_io(base, "write -P 0x61 0 1M", "write -c -P 0x62 1M 4k")
    top = create(d / "v2top.qcow2", "2M", "compat=0.10", backing="v2base.qcow2")
    qemu_io(top, "write -P 0x63 64k 64k", "write -z 192k 64k")  # v2: zeroes are written as data
    return top


@scenario
def raw_backing_sparse(d: Path) -> Path:
    raw = d / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(64 * KiB)
        f.write(b"\x71" * 300 * KiB)
        f.seek(1536 * KiB)
        f.write(os.urandom(100 * KiB))
    top = create(d / "top.qcow2", "2M", backing="base.raw", fmt="raw")
    qemu_io(top, "write -P 0x72 128k 64k", "write -z 1536k 64k")
    return top


@scenario
def four_layers_mixed_cluster_sizes(d: Path) -> Path:
    # Sizes are multiples of 512 but not of the cluster sizes.
    size = 5 * MiB + 3 * 512
    layers = [("l0.qcow2", "cluster_size=2M"), ("l1.qcow2", "cluster_size=512"),
              ("l2.qcow2", "cluster_size=4k"), ("l3.qcow2", "cluster_size=128k")]
    prev = None
    rng = random.Random(4)
    for i, (name, opt) in enumerate(layers):
        img = create(d / name, size, opt, backing=prev)
        cmds = []
        for _ in range(12):
            off = rng.randrange(0, size - 8192) // 512 * 512
            n = rng.choice([512, 4096, 70 * 1024, 300 * 1024])
            n = min(n, size - off)
            kind = rng.random()
            if kind < 0.7:
                cmds.append(f"write -P {0x80 + i * 8 + rng.randrange(8)} {off} {n}")
            elif kind < 0.85:
                cmds.append(f"write -z {off} {n}")
            else:
                cmds.append(f"discard {off} {n}")
        cmds.append(f"write -P {0xA0 + i} {size - 512} 512")  # the very last sector
        qemu_io(img, *cmds)
        prev = name
    return d / layers[-1][0]


@scenario
def backing_shorter_than_overlay(d: Path) -> Path:
    base = create(d / "short.qcow2", "1M")
    qemu_io(base, "write -P 0x91 0 1M")
    mid = create(d / "mid.qcow2", "3M", backing="short.qcow2")
    qemu_io(mid, "write -P 0x92 2M 64k")
    top = create(d / "top.qcow2", "4M", "cluster_size=4k", backing="mid.qcow2")
    qemu_io(top, "write -P 0x93 3M 4k")
    return top


@scenario
def size_not_in_whole_sectors(d: Path) -> Path:
    """No qemu-img makes one, but a header may say it: QEMU counts whole
    sectors, so the layer ends at the last one and the image above reads
    zeros after it, not that layer's backing file."""
    base = create(d / "base.qcow2", "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    mid = create(d / "mid.qcow2", "1M", backing="base.qcow2")
    qemu_io(mid, "write -P 0x12 0 4k")
    with open(mid, "r+b") as f:
        f.seek(24)  # the header's size field
        f.write((MiB - 300).to_bytes(8, "big"))
    qemu_img("create", "-f", "qcow2", "-u", "-b", "mid.qcow2", "-F", "qcow2", str(d / "top.qcow2"), "1M")
    return d / "top.qcow2"


@scenario
def relative_backing_in_other_directory(d: Path) -> Path:
    (d / "b").mkdir()
    (d / "a").mkdir()
    base = create(d / "b" / "base.qcow2", "1M")
    qemu_io(base, "write -P 0xA1 0 512k")
    top = create(d / "a" / "top.qcow2", "1M", backing="../b/base.qcow2")
    qemu_io(top, "write -P 0xA2 256k 64k")
    return top


@scenario
def empty_and_unallocated(d: Path) -> Path:
    return create(d / "empty.qcow2", "10M")


@scenario
def huge_sparse_virtual_size(d: Path) -> Path:
    img = create(d / "huge.qcow2", "4T")
    qemu_io(img, "write -P 0xB1 0 64k", "write -P 0xB2 2T 64k", "write -z 3T 1M", f"write -P 0xB3 {(4 << 40) - MiB} 1M")
    return img


SMALL = [name for name in SCENARIOS if name != "huge_sparse_virtual_size"]


@pytest.mark.parametrize("name", SMALL)
def test_bytes_equal_qemu_convert(name: str, tmp_path: Path, read_loop: str) -> None:
    tip = SCENARIOS[name](tmp_path)
    expected = qemu_raw(tip, tmp_path)
    with ChainView.open(str(tip)) as view:
        assert view.size == len(expected)
        assert view.read(0, view.size) == expected
        rng = random.Random(name)
        for _ in range(200):
            off = rng.randrange(0, view.size)
            n = rng.choice([1, 511, 4096, 65536, 200_000])
            assert view.read(off, n) == expected[off : off + n], (off, n)
        # readinto overwrites whatever the buffer held, holes included.
        buf = bytearray(b"\xee" * min(view.size, 3 * MiB))
        view.readinto(0, memoryview(buf))
        assert buf == expected[: len(buf)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_map_equals_qemu_map(name: str, tmp_path: Path) -> None:
    tip = SCENARIOS[name](tmp_path)
    with ChainView.open(str(tip)) as view:
        ours = normalize_map([m.as_json_dict() for m in view.map()])
    assert ours == normalize_map(qemu_map(tip))


def test_huge_virtual_size_reads_at_the_ends(tmp_path: Path) -> None:
    tip = huge_sparse_virtual_size(tmp_path)
    T = 1 << 40
    with ChainView.open(str(tip)) as view:
        assert view.size == 4 * T
        assert view.read(0, 64 * KiB) == b"\xb1" * 64 * KiB
        assert view.read(2 * T - 10, 20) == bytes(10) + b"\xb2" * 10
        assert view.read(4 * T - MiB, MiB) == b"\xb3" * MiB
        assert view.read(4 * T - 5, 100) == b"\xb3" * 5  # clipped at the end
        assert view.read(3 * T, 4096) == bytes(4096)
        assert view.extent_count < 20


@pytest.mark.parametrize("name", [n for n in SMALL if "raw" not in n])
def test_our_check_agrees_with_qemu_check(name: str, tmp_path: Path) -> None:
    tip = SCENARIOS[name](tmp_path)
    report = check_image(str(tip))
    assert report.ok, report.render()


@pytest.mark.long
def test_depth_does_not_grow_the_index(tmp_path: Path) -> None:
    """64 layers each owning one cluster: the index has one extent per
    owned cluster plus the gaps, whatever the depth."""
    prev = None
    for i in range(64):
        img = create(tmp_path / f"l{i:02d}.qcow2", "8M", backing=prev)
        qemu_io(img, f"write -P {i + 1} {i * 128}k 64k")
        prev = img.name
    with ChainView.open(str(tmp_path / "l63.qcow2")) as view:
        assert view.depth == 64
        assert view.extent_count == 2 * 64  # each owned cluster and the gap after it
        for i in range(64):
            assert view.read(i * 128 * KiB, 64 * KiB) == bytes([i + 1]) * 64 * KiB


_CONCURRENT_READER = """
import random, sys, threading
from engine.chain import ChainView
tip, raw = sys.argv[1], sys.argv[2]
expected = open(raw, "rb").read()
view = ChainView.open(tip)
wrong, errors = [], []
def reader(seed):
    rng = random.Random(seed)
    try:
        for _ in range(1500):
            off = rng.randrange(0, len(expected))
            n = rng.choice([4096, 65536, 150_000])
            if view.read(off, n) != expected[off : off + n]:
                wrong.append(off)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(wrong), "wrong reads,", len(errors), "errors", errors[:3])
"""


@pytest.mark.parametrize("name", ["convert_compressed_zlib", "convert_compressed_zstd"])
def test_concurrent_reads_of_compressed_clusters(name: str, tmp_path: Path) -> None:
    """The mount reads one view from its event loop and its workers at once.

    In a subprocess: before per-thread zstd decompressors, this returned
    wrong bytes, reported sound clusters as corrupt, and could crash the
    interpreter.
    """
    import subprocess
    import sys

    tip = SCENARIOS[name](tmp_path)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(qemu_raw(tip, tmp_path))
    proc = subprocess.run([sys.executable, "-c", _CONCURRENT_READER, str(tip), str(raw)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0 wrong reads, 0 errors []", proc.stdout


def test_extended_l2_ignores_bit_0_as_qemu_does(tmp_path: Path) -> None:
    """Bit 0 of an extended L2 entry has no meaning (the subcluster bitmap
    says what is zero): QEMU reads through it and its check is clean; we
    refused the image while our own check called it clean."""
    import struct

    img = tmp_path / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", str(img), "1M")
    qemu_io(img, "write -P 0x61 0 64k", "write -P 0x62 64k 4k")
    with open(img, "r+b") as f:
        l1_offset = struct.unpack(">Q", os.pread(f.fileno(), 8, 40))[0]
        l2_offset = struct.unpack(">Q", os.pread(f.fileno(), 8, l1_offset))[0] & ((1 << 56) - 512)
        for entry in (0, 1):  # a whole cluster, and one with a single subcluster
            at = l2_offset + 16 * entry
            word = struct.unpack(">Q", os.pread(f.fileno(), 8, at))[0]
            os.pwrite(f.fileno(), struct.pack(">Q", word | 1), at)
    assert "No errors were found" in qemu_img("check", str(img))
    expected = qemu_raw(img, tmp_path)
    with ChainView.open(str(img)) as view:
        assert view.read(0, view.size) == expected
        assert normalize_map([m.as_json_dict() for m in view.map()]) == normalize_map(qemu_map(img))
    assert check_image(str(img)).ok


@pytest.mark.parametrize("length", [1000, 511, 1])
def test_a_raw_file_of_part_of_a_sector_is_read_as_whole_sectors(length: int, tmp_path: Path) -> None:
    """QEMU rounds a raw file up to whole sectors (the rest reads zeros):
    we read 1000 bytes where it read 1024, and mapped an overlay's tail as
    unallocated where it says the raw layer holds zeros."""
    raw = tmp_path / "b.raw"
    raw.write_bytes(random.Random(length).randbytes(length))
    over = create(tmp_path / "o.qcow2", "1M", backing="b.raw", fmt="raw")
    for image in (raw, over):
        expected = qemu_raw(image, tmp_path)
        with ChainView.open(str(image)) as view:
            assert view.size == len(expected)
            assert view.read(0, view.size) == expected
            assert normalize_map([m.as_json_dict() for m in view.map()]) == normalize_map(qemu_map(image))
