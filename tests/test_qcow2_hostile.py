"""Hostile and corrupt qcow2 input: one clear error, bounded time and memory.

The reader must refuse what it cannot read with ``ImageError`` (whose
message starts with the file's path, then the problem), never hang, never
let another exception escape to the caller, and never allocate what a
hostile header merely asks for. Every explicit case below starts from a real
image made by QEMU (or by our writer) and patches a few bytes; the
hypothesis tests then mutate small valid images at random and require that
opening, mapping, reading and checking them either works or raises
``ImageError``, within a deadline and a memory bound.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.chain import ChainView
from engine.errors import ImageError, UsageError
from engine.qcow2.backing import open_chain
from engine.qcow2.check import check_image
from engine.qcow2.format import (
    EXT_CRYPTO,
    MAX_CHAIN_DEPTH,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
    parse_header,
)
from engine.qcow2.info import describe_layer
from engine.qcow2.layers import Qcow2Layer, open_layer
from engine.qcow2.writer import Qcow2Writer
from engine.repo import Repository

from tests.commands import cli
from tests.oracle import qemu_raw

KiB = 1024
MiB = 1024 * KiB

# Header fields: name -> (offset, struct format).
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
V2_FIELDS = [name for name, (off, _f) in FIELDS.items() if off < 72]

# The writes every standard image gets: data, a zero cluster, a compressed
# cluster and a partial cluster (so the image has every kind of L2 entry).
STD_WRITES = (
    "write -q -P 0x11 0 4k",
    "write -q -z 8k 4k",
    "write -q -c -P 0x22 16k 4k",
    "write -q -P 0x33 20k 2k",
)


# -- helpers ------------------------------------------------------------------


def _run(*cmd: str | os.PathLike[str]) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def build(
    path: Path,
    *,
    cluster: int = 4096,
    size: str = "64K",
    opts: tuple[str, ...] = (),
    writes: tuple[str, ...] = STD_WRITES,
    backing: str | None = None,
    backing_fmt: str = "qcow2",
) -> Path:
    """A real image made by qemu-img, then written by qemu-io."""
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o", ",".join([f"cluster_size={cluster}", *opts])]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    _run("qemu-img", *args, path, size)
    if writes:
        cmds: list[str] = []
        for w in writes:
            cmds += ["-c", w]
        _run("qemu-io", "-f", "qcow2", *cmds, path)
    return path


class Img:
    """Byte-level access to one image file, for patching its structures."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    @property
    def header(self) -> Header:
        data = self.data
        return parse_header(str(self.path), data, len(data))

    @property
    def cs(self) -> int:
        return 1 << struct.unpack_from(">I", self.data, 20)[0]

    def get(self, fmt: str, offset: int) -> int:
        return struct.unpack_from(fmt, self.data, offset)[0]

    def put(self, fmt: str, offset: int, value: int) -> None:
        buf = bytearray(self.data)
        end = offset + struct.calcsize(fmt)
        if end > len(buf):
            buf += bytes(end - len(buf))
        struct.pack_into(fmt, buf, offset, value)
        self.path.write_bytes(bytes(buf))

    def put_bytes(self, offset: int, raw: bytes) -> None:
        buf = bytearray(self.data)
        buf[offset : offset + len(raw)] = raw
        self.path.write_bytes(bytes(buf))

    def set_field(self, name: str, value: int) -> None:
        offset, fmt = FIELDS[name]
        self.put(fmt, offset, value)

    def truncate(self, length: int) -> None:
        os.truncate(self.path, length)

    # Table locations (read with the header as it is now).

    def l1_entry(self, index: int) -> int:
        """File offset of L1 entry ``index``."""
        return self.header.l1_table_offset + 8 * index

    def l2_table(self, l1_index: int = 0) -> int:
        return self.get(">Q", self.l1_entry(l1_index)) & OFFSET_MASK

    def l2_entry(self, guest: int) -> int:
        """File offset of the L2 entry mapping guest offset ``guest``."""
        h = self.header
        per_l2 = h.l2_entries * h.cluster_size
        l2 = self.l2_table(guest // per_l2)
        assert l2, "no L2 table there"
        return l2 + (guest % per_l2) // h.cluster_size * h.l2_entry_bytes

    def refblock(self, index: int = 0) -> int:
        return self.get(">Q", self.header.refcount_table_offset + 8 * index) & ~0x1FF

    def refcount_entry(self, cluster: int) -> int:
        """File offset of the (16-bit) refcount of host cluster ``cluster``."""
        h = self.header
        assert h.refcount_order == 4
        per_block = h.cluster_size // 2
        return self.refblock(cluster // per_block) + 2 * (cluster % per_block)


def rename_backing(path: Path, new_name: str) -> None:
    """Replace the backing file name in place (same length, no other change)."""
    img = Img(path)
    offset, size = img.get(">Q", 8), img.get(">I", 16)
    assert len(new_name.encode()) == size, (new_name, size)
    img.put_bytes(offset, new_name.encode())


@contextmanager
def refused(path: Path | str, problem: str) -> Iterator[pytest.ExceptionInfo[ImageError]]:
    """Expect an ImageError whose message is "<path>: <problem...>"."""
    with pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: .*{problem}") as info:
        yield info
    assert info.value.path == str(path)


def open_and_read(path: Path | str) -> None:
    """What a user does with a chain: open it, map it, read all of it."""
    with ChainView.open(str(path)) as view:
        list(view.map())
        view.read(0, view.size)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def std_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build(tmp_path_factory.mktemp("std") / "std.qcow2").read_bytes()


@pytest.fixture
def std(tmp_path: Path, std_bytes: bytes) -> Img:
    """64 KiB, 4 KiB clusters: data at 0, zeros at 8k, compressed at 16k, data at 20k.

    Layout (QEMU 7.2): header 0x0, refcount table 0x1000, refcount block
    0x2000, L1 0x3000, L2 0x4000, data 0x5000, compressed 0x6000, data 0x7000.
    """
    path = tmp_path / "std.qcow2"
    path.write_bytes(std_bytes)
    return Img(path)


# -- header -----------------------------------------------------------------------


def test_a_valid_image_reads(std: Img) -> None:
    """The baseline every patch below starts from."""
    with ChainView.open(str(std.path)) as view:
        disk = view.read(0, view.size)
    assert disk[:4096] == b"\x11" * 4096
    assert disk[16 * KiB : 20 * KiB] == b"\x22" * 4096
    assert disk[20 * KiB : 22 * KiB] == b"\x33" * 2048
    assert check_image(str(std.path)).ok


@pytest.mark.parametrize("magic", [b"QFI\xfa", b"\0\0\0\0", b"QED\0"])
def test_bad_magic(std: Img, magic: bytes) -> None:
    std.put_bytes(0, magic)
    with refused(std.path, r"not a qcow2 image \(bad magic\)"):
        Qcow2Layer(str(std.path))
    with refused(std.path, "bad magic"):
        open_layer(str(std.path), "qcow2")
    with refused(std.path, "bad magic"):
        check_image(str(std.path))


def test_bad_magic_in_a_qcow2_backing_file(tmp_path: Path) -> None:
    """The tip is probed (a file without the magic is raw, as QEMU does), but
    a backing file declared qcow2 must be qcow2."""
    base = build(tmp_path / "base.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="base.qcow2", writes=())
    Img(base).put_bytes(0, b"XXXX")
    with refused(base, "bad magic"):
        ChainView.open(str(tip))


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(std: Img, version: int) -> None:
    std.set_field("version", version)
    with refused(std.path, f"unsupported qcow2 version {version}"):
        ChainView.open(str(std.path))
    with refused(std.path, "unsupported qcow2 version"):
        check_image(str(std.path))


@pytest.mark.parametrize("bits", [0, 8, 22, 31, 63, 0xFFFFFFFF])
def test_cluster_bits_out_of_range(std: Img, bits: int) -> None:
    std.set_field("cluster_bits", bits)
    with refused(std.path, f"cluster_bits {bits} out of range"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("method", [1, 2, 3])
def test_crypt_method(std: Img, method: int) -> None:
    std.set_field("crypt_method", method)
    with refused(std.path, "encrypted images are not supported"):
        ChainView.open(str(std.path))
    with refused(std.path, "encrypted"):
        check_image(str(std.path))


def _encrypted(path: Path, fmt: str) -> Path:
    """A real encrypted image (LUKS creation costs ~2 s of key derivation: once per module)."""
    opts = f"encrypt.format={fmt},encrypt.key-secret=sec0,cluster_size=4096"
    if fmt == "luks":
        opts += ",encrypt.iter-time=10"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456", "-o", opts,
            str(path), "64K"]
    for _ in range(5):
        proc = subprocess.run(argv, capture_output=True, text=True)
        # QEMU times its key derivation with the thread's CPU clock; when a
        # round reads as 0 ms it gives up (seen once in a full run): again.
        if proc.returncode == 0 or "Unable to get accurate CPU usage" not in proc.stderr:
            break
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return path


@pytest.fixture(scope="module")
def luks_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _encrypted(tmp_path_factory.mktemp("luks") / "luks.qcow2", "luks").read_bytes()


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_real_encrypted_images(tmp_path: Path, fmt: str, luks_bytes: bytes) -> None:
    path = tmp_path / f"{fmt}.qcow2"
    if fmt == "luks":
        path.write_bytes(luks_bytes)
    else:
        _encrypted(path, fmt)
    assert Img(path).get(">I", 32) == (2 if fmt == "luks" else 1)
    with refused(path, "encrypted images are not supported"):
        ChainView.open(str(path))
    with refused(path, "encrypted images are not supported"):
        check_image(str(path))


def test_luks_extension_without_crypt_method(tmp_path: Path, luks_bytes: bytes) -> None:
    """The LUKS header extension alone is enough to refuse the image."""
    path = tmp_path / "luks.qcow2"
    path.write_bytes(luks_bytes)
    img = Img(path)
    assert img.get(">I", img.get(">I", 100)) == EXT_CRYPTO
    img.set_field("crypt_method", 0)
    with refused(path, "encrypted images are not supported"):
        ChainView.open(str(path))


def test_real_external_data_file(tmp_path: Path) -> None:
    # An absolute name: qemu-img would create a relative one in the current directory.
    path = build(tmp_path / "ext.qcow2", opts=(f"data_file={tmp_path / 'ext.raw'}",), writes=())
    with refused(path, "external data file"):
        ChainView.open(str(path))


def test_external_data_file_bit(std: Img) -> None:
    std.set_field("incompatible_features", 1 << 2)
    with refused(std.path, "images with an external data file are not supported"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("bit", [5, 6, 31, 63])
def test_unknown_incompatible_bit(std: Img, bit: int) -> None:
    std.set_field("incompatible_features", 1 << bit)
    with refused(std.path, f"unknown incompatible feature bits {1 << bit:#x}"):
        ChainView.open(str(std.path))


def test_corrupt_bit(std: Img, tmp_path: Path) -> None:
    """QEMU stops writing an image it marked corrupt and still reads it:
    so do we (check and info above all, the tools that diagnose it), with
    a warning; only adopting it as backups is refused."""
    expected = qemu_raw(std.path, tmp_path)
    std.set_field("incompatible_features", 1 << 1)
    with ChainView.open(str(std.path)) as view:
        assert view.read(0, view.size) == expected
    report = check_image(str(std.path))
    assert report.ok and "QEMU marked the image corrupt" in report.render()
    with open_layer(str(std.path), "qcow2") as layer:
        assert describe_layer(layer, 0)["corrupt"] is True
    cat = cli("image", "cat", std.path)
    assert cat.stdout == expected
    assert b"warning: " + bytes(std.path) + b": QEMU marked this image corrupt" in cat.stderr
    Repository.init(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo")) as repo:
        with pytest.raises(UsageError, match="QEMU marked this image corrupt.*before importing"):
            repo.import_chain("vm", str(std.path))
        assert repo.catalog.device("vm") is None


def test_zero_flag_in_a_version_2_image(tmp_path: Path) -> None:
    """Version 2 has no zero clusters: QEMU refuses such an entry as
    corrupt, where reading zeros would hide the data the entry points at."""
    img = Img(build(tmp_path / "v2.qcow2", opts=("compat=0.10",), writes=("write -q -P 0x11 0 4k",)))
    entry = img.l2_entry(0)
    img.put(">Q", entry, img.get(">Q", entry) | OFLAG_ZERO)
    assert subprocess.run(["qemu-img", "convert", "-O", "raw", str(img.path), str(tmp_path / "q.raw")],
                          capture_output=True).returncode != 0
    with refused(img.path, "zero flag in a version 2 image"):
        open_and_read(img.path)
    assert not check_image(str(img.path)).ok


def test_unknown_compatible_and_autoclear_bits_are_fine(std: Img) -> None:
    """Only incompatible bits may refuse an image; the others are ignorable by definition."""
    std.set_field("compatible_features", 1 << 40)
    std.set_field("autoclear_features", 1 << 40)
    open_and_read(std.path)


@pytest.mark.parametrize(
    ("features", "ctype", "problem"),
    [
        (1 << 3, 0, "compression type bit set but no compression type given"),
        (0, 1, "compression type field set without its feature bit"),
        (1 << 3, 2, "unknown compression type 2"),
        (1 << 3, 255, "unknown compression type 255"),
    ],
)
def test_compression_type(std: Img, features: int, ctype: int, problem: str) -> None:
    std.set_field("incompatible_features", features)
    std.set_field("compression_type", ctype)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


def test_extended_l2_needs_16k_clusters(std: Img) -> None:
    std.set_field("incompatible_features", 1 << 4)
    with refused(std.path, "extended L2 entries need clusters of at least 16 KiB"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("order", [7, 64, 0xFFFFFFFF])
def test_refcount_order_out_of_range(std: Img, order: int) -> None:
    std.set_field("refcount_order", order)
    with refused(std.path, f"refcount_order {order} out of range"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("length", "problem"),
    [
        (0, "invalid header_length 0"),
        (100, "invalid header_length 100"),
        (113, "invalid header_length 113"),
        (8192, "header_length 8192 exceeds the first cluster"),
        (0xFFFFFFF8, "exceeds the first cluster"),
    ],
)
def test_header_length(std: Img, length: int, problem: str) -> None:
    std.set_field("header_length", length)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


def test_header_extension_runs_past_the_header(std: Img) -> None:
    # Right after the 112-byte header: an unknown extension claiming 1 MiB.
    std.put_bytes(112, struct.pack(">II", 0x12345678, MiB))
    with refused(std.path, "header extension 0x12345678 runs past the header area"):
        ChainView.open(str(std.path))


def test_duplicate_backing_format_extension(std: Img) -> None:
    ext = struct.pack(">II", 0xE2792ACA, 5) + b"qcow2\0\0\0"
    std.put_bytes(112, ext + ext + bytes(8))  # twice, then the end marker
    with refused(std.path, "header extension 0xe2792aca appears twice"):
        ChainView.open(str(std.path))


# -- tables in the header ---------------------------------------------------------


def test_l1_table_misaligned(std: Img) -> None:
    std.set_field("l1_table_offset", std.header.l1_table_offset + 8)
    with refused(std.path, r"L1 table offset 0x3008 is not cluster-aligned"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("where", ["eof", "far", "max"])
def test_l1_table_beyond_eof(std: Img, where: str) -> None:
    offset = {"eof": std.file_size, "far": 1 << 40, "max": OFFSET_MASK & ~0xFFF}[where]
    std.set_field("l1_table_offset", offset)
    with refused(std.path, rf"L1 table at {offset:#x} \(\+8 bytes\) lies outside the file"):
        ChainView.open(str(std.path))


def test_l1_table_over_the_header(std: Img) -> None:
    std.set_field("l1_table_offset", 0)
    with refused(std.path, "L1 table overlaps the header"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("l1_size", "size", "problem"),
    [
        (0, 64 * KiB, r"L1 table too small: 0 entries for a virtual size of 65536 \(needs 1\)"),
        (1, 4 * MiB, r"L1 table too small: 1 entries for a virtual size of 4194304 \(needs 2\)"),
        (1, 1 << 62, "L1 table too small"),
        (1, (1 << 64) - 1, "L1 table too small"),
    ],
)
def test_l1_too_small_for_the_size(std: Img, l1_size: int, size: int, problem: str) -> None:
    std.set_field("l1_size", l1_size)
    std.set_field("size", size)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


@pytest.mark.parametrize("l1_size", [0x400001, 0x7FFFFFFF, 0xFFFFFFFF])
def test_l1_size_over_32_mib(std: Img, l1_size: int) -> None:
    std.set_field("l1_size", l1_size)
    with refused(std.path, f"L1 table of {l1_size} entries exceeds QEMU's 32 MiB limit"):
        ChainView.open(str(std.path))


def test_l1_size_within_limit_but_beyond_eof(std: Img) -> None:
    """32 MiB exactly is allowed by QEMU, but this file is 32 KiB."""
    std.set_field("l1_size", 0x400000)
    with refused(std.path, r"L1 table at 0x3000 \(\+33554432 bytes\) lies outside the file"):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("refcount_table_offset", 1 << 30, r"refcount table at 0x40000000 \(\+4096 bytes\) lies outside the file"),
        ("refcount_table_offset", 0x1001, "refcount table offset 0x1001 is not cluster-aligned"),
        ("refcount_table_clusters", 8, r"refcount table at 0x1000 \(\+32768 bytes\) lies outside the file"),
        ("refcount_table_clusters", 0xFFFFFFFF, "refcount table of 4294967295 clusters exceeds QEMU's 8 MiB limit"),
    ],
)
def test_refcount_table_bad(std: Img, name: str, value: int, problem: str) -> None:
    std.set_field(name, value)
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    with refused(std.path, problem):
        check_image(str(std.path))


@pytest.mark.parametrize(
    ("nb", "offset", "problem"),
    [
        (1, 1 << 30, "snapshot table at 0x40000000 .* lies outside the file"),
        (1, 0x800, "snapshot table offset 0x800 is not cluster-aligned"),
        (65537, 0x1000, "65537 internal snapshots exceeds QEMU's limit"),
        (0xFFFFFFFF, 0x1000, "internal snapshots exceeds QEMU's limit"),
    ],
)
def test_snapshot_table_bad(std: Img, nb: int, offset: int, problem: str) -> None:
    std.set_field("nb_snapshots", nb)
    std.set_field("snapshots_offset", offset)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


@pytest.mark.parametrize(
    ("offset", "size", "problem"),
    [
        (2048, 5000, "backing file name of 5000 bytes is too long"),
        (4090, 100, "backing file name lies outside the header cluster"),
        (1 << 63, 10, "backing file name lies outside the header cluster"),
        (16, 10, "backing file name overlaps the header"),
    ],
)
def test_backing_name_fields(std: Img, offset: int, size: int, problem: str) -> None:
    std.set_field("backing_file_offset", offset)
    std.set_field("backing_file_size", size)
    with refused(std.path, problem):
        ChainView.open(str(std.path))


def test_an_empty_backing_name_is_no_backing_file(std: Img, tmp_path: Path) -> None:
    """As QEMU reads it: an offset with a name of no bytes names nothing."""
    std.set_field("backing_file_offset", 2048)
    std.set_field("backing_file_size", 0)
    with ChainView.open(str(std.path)) as view:
        assert view.depth == 1
        assert view.read(0, view.size) == qemu_raw(std.path, tmp_path)


# -- L1 and L2 entries ------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (lambda img: (1 << 30) | OFLAG_COPIED, r"L2 table at 0x40000000 \(L1 entry 0\) lies outside the file"),
        (lambda img: img.file_size | OFLAG_COPIED, r"\(L1 entry 0\) lies outside the file"),
        (lambda img: (img.l2_table() + 512) | OFLAG_COPIED, r"L2 table offset 0x4200 \(L1 entry 0\) is not cluster-aligned"),
        (lambda img: img.l2_table() | OFLAG_COPIED | 1 << 56, "L1 entry 0 has reserved bits set"),
        (lambda img: img.l2_table() | OFLAG_COPIED | 1, "L1 entry 0 has reserved bits set"),
    ],
    ids=["far", "eof", "misaligned", "reserved-high", "reserved-low"],
)
def test_l1_entry_bad(std: Img, entry: Callable[[Img], int], problem: str) -> None:
    std.put(">Q", std.l1_entry(0), entry(std))
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    report = check_image(str(std.path))
    assert not report.ok


def test_same_l2_table_twice_in_l1(tmp_path: Path) -> None:
    """512-byte clusters: one L2 table covers 32 KiB, so 64 KiB needs two."""
    img = Img(build(tmp_path / "two.qcow2", cluster=512, writes=("write -q -P 1 0 1k", "write -q -P 2 40k 1k")))
    assert img.header.l1_size == 2 and img.l2_table(1)
    img.put(">Q", img.l1_entry(1), img.get(">Q", img.l1_entry(0)))
    with refused(img.path, "is referenced twice by the L1 table"):
        ChainView.open(str(img.path))
    report = check_image(str(img.path))
    assert report.error_count and any("twice" in m for m in report.errors), report.render()


@pytest.mark.parametrize(
    ("guest", "entry", "problem"),
    [
        (0, lambda img, e: e + 512, "data cluster offset is not cluster-aligned .*entry 0, guest offset 0x0"),
        (0, lambda img, e: (e & ~OFFSET_MASK) | (1 << 40), "data cluster lies outside the file"),
        (0, lambda img, e: (e & ~OFFSET_MASK) | img.file_size, "data cluster lies outside the file"),
        (20 * KiB, lambda img, e: e | 2, "L2 entry has reserved bits set .*entry 5"),
        (20 * KiB, lambda img, e: e | 1 << 57, "L2 entry has reserved bits set"),
    ],
    ids=["misaligned", "far", "eof", "reserved-low", "reserved-high"],
)
def test_l2_entry_bad(std: Img, guest: int, entry: Callable[[Img, int], int], problem: str) -> None:
    where = std.l2_entry(guest)
    std.put(">Q", where, entry(std, std.get(">Q", where)))
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    report = check_image(str(std.path))
    assert not report.ok, report.render()


def test_zero_flag_with_a_bad_offset_is_still_refused(std: Img) -> None:
    where = std.l2_entry(8 * KiB)
    std.put(">Q", where, OFLAG_ZERO | (1 << 40))
    with refused(std.path, "data cluster lies outside the file"):
        ChainView.open(str(std.path))


def _compressed_descriptor(img: Img, coffset: int, nsectors: int) -> int:
    shift = 62 - (img.header.cluster_bits - 8)
    return OFLAG_COMPRESSED | (nsectors - 1) << shift | coffset


@pytest.mark.parametrize(
    ("coffset", "problem"),
    [
        (lambda img: img.file_size, "compressed cluster lies outside the file"),
        (lambda img: 1 << 40, "compressed cluster lies outside the file"),
        (lambda img: 100, "compressed cluster overlaps the header"),
    ],
    ids=["eof", "far", "header"],
)
def test_compressed_descriptor_bad(std: Img, coffset: Callable[[Img], int], problem: str) -> None:
    where = std.l2_entry(16 * KiB)
    assert std.get(">Q", where) & OFLAG_COMPRESSED
    std.put(">Q", where, _compressed_descriptor(std, coffset(std), 1))
    with refused(std.path, problem):
        ChainView.open(str(std.path))
    assert not check_image(str(std.path)).ok


def _compressed_span(img: Img, guest: int) -> tuple[int, int]:
    with Qcow2Layer(str(img.path)) as layer:
        return layer.compressed_span(img.get(">Q", img.l2_entry(guest)))


KINDS = {
    "zlib-4k": dict(cluster=4096, opts=()),
    "zstd-4k": dict(cluster=4096, opts=("compression_type=zstd",)),
    "zlib-512": dict(cluster=512, opts=()),
    "zstd-extl2-32k": dict(cluster=32 * KiB, opts=("compression_type=zstd", "extended_l2=on")),
    "zlib-v2": dict(cluster=4096, opts=("compat=0.10",)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("garbage", ["random", "zeros", "ones"])
def test_compressed_garbage_is_an_image_error_on_read(tmp_path: Path, kind: str, garbage: str) -> None:
    cluster = KINDS[kind]["cluster"]
    writes = (f"write -q -P 0x44 0 {cluster}", f"write -q -c -P 0x22 {cluster} {cluster}")
    img = Img(build(tmp_path / "c.qcow2", cluster=cluster, size="256K", opts=KINDS[kind]["opts"], writes=writes))
    coffset, csize = _compressed_span(img, cluster)
    fill = {
        "random": random.Random(7).randbytes(csize),
        "zeros": bytes(csize),
        "ones": b"\xff" * csize,
    }[garbage]
    img.put_bytes(coffset, fill)
    with ChainView.open(str(img.path)) as view:  # the tables are fine...
        assert view.read(0, cluster) == b"\x44" * cluster  # ...and so is the rest
        with refused(img.path, f"compressed cluster at {coffset:#x} (is corrupt|decompresses to)"):
            view.read(cluster, cluster)
        with refused(img.path, "compressed cluster"):
            view.read(0, view.size)


def test_zstd_cluster_that_decompresses_to_more_than_a_cluster(tmp_path: Path) -> None:
    """QEMU fails the read with EIO; we returned the first cluster's worth
    as if it were the data, and qemu-img check cannot see it (it does not
    decompress)."""
    import zstandard

    cluster = 4096
    writes = (f"write -q -c -P 0x22 0 {cluster}",)
    img = Img(build(tmp_path / "z.qcow2", cluster=cluster, size="64K", opts=("compression_type=zstd",),
                    writes=writes))
    coffset, csize = _compressed_span(img, 0)
    frame = zstandard.ZstdCompressor().compress(b"\x22" * (cluster + 512))
    assert len(frame) <= csize
    img.put_bytes(coffset, frame)
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read 0 {cluster}", str(img.path)],
                          capture_output=True, text=True)
    assert "Input/output error" in proc.stdout + proc.stderr  # QEMU's answer
    with ChainView.open(str(img.path)) as view:
        with refused(img.path, f"compressed cluster at {coffset:#x} decompresses to more than the cluster size"):
            view.read(0, cluster)


def test_compressed_length_too_short(tmp_path: Path) -> None:
    """A descriptor claiming one sector for a cluster that needs several."""
    rng = random.Random(3)
    src = tmp_path / "text.bin"
    src.write_bytes(bytes(rng.choice(b"abcdefghijklmnop") for _ in range(4096)))
    img = Img(build(tmp_path / "c.qcow2", writes=(f"write -q -c -s {src} 0 4k",)))
    where = img.l2_entry(0)
    coffset, csize = _compressed_span(img, 0)
    assert csize > 1024  # several sectors of compressed data
    img.put(">Q", where, _compressed_descriptor(img, coffset, 1))
    with ChainView.open(str(img.path)) as view:
        with refused(img.path, f"compressed cluster at {coffset:#x} (decompresses to|is corrupt)"):
            view.read(0, 4096)


def test_compressed_length_at_maximum_still_reads(std: Img) -> None:
    """The longest length the descriptor can express reads past EOF, as QEMU allows."""
    where = std.l2_entry(16 * KiB)
    coffset, _csize = _compressed_span(std, 16 * KiB)
    std.put(">Q", where, _compressed_descriptor(std, coffset, 1 << (std.header.cluster_bits - 8)))
    with ChainView.open(str(std.path)) as view:
        assert view.read(16 * KiB, 4096) == b"\x22" * 4096


# -- truncated and empty files ----------------------------------------------------


@pytest.mark.parametrize(
    ("length", "problem"),
    [
        (0, r"not a qcow2 image \(bad magic\)"),
        (3, "bad magic"),
        (4, "truncated qcow2 header"),
        (71, "truncated qcow2 header"),
        (100, "truncated version 3 header"),
        (110, "header_length 112 exceeds the first cluster"),
        (2000, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file \(2000 bytes\)"),
        (4095, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file \(4095 bytes\)"),
        (4096 + 100, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file \(4196 bytes\)"),
        (0x3000 + 4, r"L1 table at 0x3000 \(\+8 bytes\) lies outside the file"),
        (0x4000 + 100, r"L2 table at 0x4000 \(L1 entry 0\) lies outside the file"),
        (0x5000 + 100, r"data cluster lies outside the file .*guest offset 0x5000"),
    ],
)
def test_truncated(std: Img, length: int, problem: str) -> None:
    std.truncate(length)
    with refused(std.path, problem):
        with open_layer(str(std.path), "qcow2") as layer:
            layer.allocation()
    # The checker refuses what the header check refuses, and reports the rest.
    try:
        report = check_image(str(std.path))
    except ImageError as e:
        assert re.search(problem, str(e)) and str(e).startswith(f"{std.path}: ")
    else:
        assert not report.ok, report.render()


def test_truncated_data_reads_as_zeros_like_qemu(std: Img) -> None:
    """Data clusters past EOF inside the table checks: a short last cluster
    (QEMU writes them) reads as zeros, not an error."""
    std.truncate(0x7000 + 1000)  # data cluster of guest 20k is at 0x7000
    assert std.get(">Q", std.l2_entry(20 * KiB)) & OFFSET_MASK == 0x7000
    with ChainView.open(str(std.path)) as view:
        assert view.read(20 * KiB, 2048) == b"\x33" * 1000 + bytes(1048)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    with refused(empty, "bad magic"):
        Qcow2Layer(str(empty))
    with refused(empty, "bad magic"):
        check_image(str(empty))
    with refused(empty, "bad magic"):
        open_layer(str(empty), "qcow2")
    # Declared qcow2 by the image above it: refused too.
    tip = build(tmp_path / "tip.qcow2", backing="empty.qcow2", writes=())
    with refused(empty, "bad magic"):
        ChainView.open(str(tip))


# -- backing chains ---------------------------------------------------------------


def test_backing_loop_a_b_a(tmp_path: Path) -> None:
    build(tmp_path / "a.qcow2", backing="b.qcow2", writes=())
    build(tmp_path / "b.qcow2", backing="a.qcow2", writes=())
    before = open_fds()
    # Named: the image met twice, and where it was first met.
    with refused(tmp_path / "a.qcow2", f"backing chain loops back to {re.escape(str(tmp_path / 'a.qcow2'))}"):
        ChainView.open(str(tmp_path / "a.qcow2"))
    assert open_fds() == before  # every layer opened so far was closed


def test_backing_loop_to_itself(tmp_path: Path) -> None:
    path = build(tmp_path / "a.qcow2", backing="x.qcow2", writes=())
    rename_backing(path, "a.qcow2")
    with refused(path, "backing chain loops back to"):
        ChainView.open(str(path))


def test_backing_loop_through_a_symlink_and_absolute_path(tmp_path: Path) -> None:
    """Loops are found by inode, not by name."""
    a = build(tmp_path / "a.qcow2", backing="alias.qcow2", writes=())
    (tmp_path / "alias.qcow2").symlink_to("b.qcow2")
    build(tmp_path / "b.qcow2", backing=str(a), writes=())
    with refused(a, f"backing chain loops back to {re.escape(str(a))}"):
        ChainView.open(str(a))


def _tiny_chain(directory: Path, n: int) -> Path:
    """n tiny images l0000 -> l0001 -> ... -> l{n-1} (the last has no backing).

    One image is made with our writer; the others are copies of its bytes
    with the (same-length) backing name changed: 1000 images in well under
    a second, no fsync each.
    """
    template = directory / "template.qcow2"
    Qcow2Writer(str(template), 64 * KiB, 512, backing_file="l0001.qcow2", backing_format="qcow2").commit()
    with_backing = template.read_bytes()
    template.unlink()
    Qcow2Writer(str(template), 64 * KiB, 512).commit()
    last = template.read_bytes()
    template.unlink()
    for i in range(n):
        data = last if i == n - 1 else with_backing.replace(b"l0001.qcow2", f"l{i + 1:04d}.qcow2".encode())
        (directory / f"l{i:04d}.qcow2").write_bytes(data)
    return directory / "l0000.qcow2"


@pytest.mark.parametrize("depth", [1, 5])
def test_chain_depth_limit_parameter(tmp_path: Path, depth: int) -> None:
    tip = _tiny_chain(tmp_path, depth + 1)
    assert len(open_chain(str(tip), max_depth=depth + 1)) == depth + 1
    with refused(tip, f"backing chain is deeper than {depth} images"):
        open_chain(str(tip), max_depth=depth)


def test_chain_of_1000_opens_and_1001_is_refused(tmp_path: Path) -> None:
    assert MAX_CHAIN_DEPTH == 1000
    tip = _tiny_chain(tmp_path, 1001)
    before = open_fds()
    t0 = time.monotonic()
    with refused(tip, "backing chain is deeper than 1000 images"):
        ChainView.open(str(tip))
    assert open_fds() == before
    # Exactly 1000 is fine: make l0999 the bottom.
    (tmp_path / "l0999.qcow2").write_bytes((tmp_path / "l1000.qcow2").read_bytes())
    with ChainView.open(str(tip)) as view:
        assert view.depth == 1000
        assert view.read(0, view.size) == bytes(64 * KiB)
        assert [e.depth for e in view.map()] == [999]
    assert time.monotonic() - t0 < 30


def test_missing_backing_file(tmp_path: Path) -> None:
    tip = build(tmp_path / "tip.qcow2", backing="gone.qcow2", writes=())
    with refused(tip, r"backing file 'gone.qcow2' not found"):
        ChainView.open(str(tip))


def test_backing_name_that_is_a_symlink_loop(tmp_path: Path) -> None:
    """Named for what it is, not as missing: the file is there, twice."""
    os.symlink("loop2.qcow2", tmp_path / "loop1.qcow2")
    os.symlink("loop1.qcow2", tmp_path / "loop2.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="loop1.qcow2", writes=())
    with refused(tip, r"backing file 'loop1.qcow2' \(.*loop1.qcow2\): Too many levels of symbolic links"):
        ChainView.open(str(tip))


@pytest.mark.parametrize(
    "name",
    [
        "nbd://host/x",
        "nbd+unix:///x?socket=/tmp/s",
        "http://example.com/disk.img",
        'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}',
    ],
)
def test_backing_protocols_are_refused(tmp_path: Path, name: str) -> None:
    tip = build(tmp_path / "tip.qcow2", backing=name, backing_fmt="raw", writes=())
    with refused(tip, "protocol; backupfs follows plain file paths only"):
        ChainView.open(str(tip))


def test_file_protocol_is_a_plain_path(tmp_path: Path) -> None:
    build(tmp_path / "base.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="file:base.qcow2", writes=())
    with ChainView.open(str(tip)) as view:
        assert view.depth == 2 and view.read(0, 4) == b"\x11" * 4


def test_unsupported_backing_format(tmp_path: Path) -> None:
    build(tmp_path / "base.qcow2")
    tip = build(tmp_path / "tip.qcow2", backing="base.qcow2", backing_fmt="vmdk", writes=())
    with refused(tip, "backing file format 'vmdk' is not supported"):
        ChainView.open(str(tip))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", None])
def test_backing_file_is_a_directory(tmp_path: Path, fmt: str | None) -> None:
    (tmp_path / "dir").mkdir()
    tip = build(tmp_path / "tip.qcow2", backing="dir", backing_fmt=fmt or "raw", writes=())
    if fmt is None:  # no backing format extension: probed
        Img(tip).put(">I", 112, 0)  # turn the extension into the end marker
        assert Img(tip).header.backing_format is None
    # Named by the image that points there: the directory alone said
    # nothing of which chain it was in.
    with refused(tip, r"backing file 'dir' \(.*/dir\) is a directory"):
        open_and_read(tip)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backing_file_is_a_fifo_does_not_hang(tmp_path: Path, fmt: str) -> None:
    os.mkfifo(tmp_path / "fifo")
    tip = build(tmp_path / "tip.qcow2", backing="fifo", backing_fmt=fmt, writes=())
    with refused(tmp_path / "fifo", "not a regular file or block device"):
        open_and_read(tip)


def test_tip_is_a_directory_or_missing(tmp_path: Path) -> None:
    with refused(tmp_path, "is a directory"):
        ChainView.open(str(tmp_path))
    with refused(tmp_path, "is a directory"):
        check_image(str(tmp_path))
    with refused(tmp_path / "nope", "no such file"):
        ChainView.open(str(tmp_path / "nope"))
    with refused(tmp_path / "nope", "no such file"):
        check_image(str(tmp_path / "nope"))


# -- memory: a hostile header asks, we do not allocate ----------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("l1_size", 0xFFFFFFFF),
        ("l1_size", 0x400000),
        ("refcount_table_clusters", 0x7FFFFFFF),
        ("nb_snapshots", 0xFFFFFFFF),
        ("backing_file_size", 0xFFFFFFFF),
        ("size", (1 << 64) - 1),
        ("header_length", 0xFFFFFFF8),
    ],
)
def test_hostile_sizes_allocate_nothing_big(std: Img, name: str, value: int) -> None:
    std.set_field(name, value)
    if name == "backing_file_size":
        std.set_field("backing_file_offset", 2048)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError):
            open_and_read(std.path)
        with pytest.raises(ImageError):
            check_image(str(std.path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak} bytes for a {std.file_size}-byte file"


def _alternating_image(path: Path, tables: int) -> int:
    """A legal image QEMU reads whose clusters alternate between two host
    clusters: one extent per cluster, nothing to merge (the worst layout a
    VM's random writes approach). Returns its number of clusters."""
    cs, per = 65536, 65536 // 8
    meta = 7  # header, refcount table, refcount block, L1, data, (a gap), data
    with open(path, "wb") as f:
        f.truncate((meta + tables) * cs)
        f.write(struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 3, 0, 0, 16, tables * per * cs, 0, tables,
                            3 * cs, 1 * cs, 1, 0, 0) + struct.pack(">QQQII", 0, 0, 0, 4, 104))
        f.seek(1 * cs)
        f.write(struct.pack(">Q", 2 * cs))
        f.seek(2 * cs)
        f.write(struct.pack(">H", 1) * (meta + tables))
        f.seek(3 * cs)
        f.write(b"".join(struct.pack(">Q", (meta + i) * cs | OFLAG_COPIED) for i in range(tables)))
        f.seek(4 * cs)
        f.write(b"\x11" * cs)
        f.seek(6 * cs)
        f.write(b"\x22" * cs)
        f.seek(meta * cs)
        f.write(struct.pack(">QQ", 4 * cs, 6 * cs) * (per // 2) * tables)
    return tables * per


def test_a_layer_of_millions_of_extents_costs_tens_of_bytes_each(tmp_path: Path) -> None:
    """Decoding all of a big layer at once, and sorting and coalescing its
    rows whole, took ~300 bytes an extent at the peak: gigabytes for a
    fragmented terabyte, where QEMU reads on with megabytes."""
    img = tmp_path / "alt.qcow2"
    clusters = _alternating_image(img, 256)
    assert subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x22 {(clusters - 1) * 65536} 64k", str(img)],
                          capture_output=True, text=True).stdout.startswith("read 65536/65536")
    tracemalloc.start()
    try:
        with ChainView.open(str(img)) as view:
            assert view.extent_count == clusters
            peak = tracemalloc.get_traced_memory()[1]
            for c in (0, 1, clusters // 2 + 1, clusters - 1):
                assert view.read(c * 65536, 65536) == (b"\x22" if c % 2 else b"\x11") * 65536
    finally:
        tracemalloc.stop()
    assert peak / clusters < 120, f"{peak / clusters:.0f} bytes an extent at the peak"


# -- the checker reports instead of raising -----------------------------------------


@pytest.mark.parametrize("cluster", [512, 65536])
def test_check_of_a_file_extended_by_a_sparse_hole(tmp_path: Path, cluster: int) -> None:
    """A valid image with terabytes of hole after it (`truncate -s`): the
    check costs what the image uses, not the file's length, and says where
    the image ends as qemu-img does."""
    img = build(tmp_path / "big.qcow2", cluster=cluster, size="1M",
                writes=("write -q -P 0x11 0 64k", "write -q -P 0x22 512k 4k"))
    qemu = json.loads(subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                                     capture_output=True, text=True).stdout)
    os.truncate(img, 4 << 40)
    tracemalloc.start()
    try:
        report = check_image(str(img))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok, report.render()
    assert peak < 16 * MiB, peak
    assert report.end_offset == qemu["image-end-offset"]
    assert f"Image end offset: {qemu['image-end-offset']}" in report.render()


def test_check_reports_a_zeroed_refcount(std: Img) -> None:
    data_cluster = (std.get(">Q", std.l2_entry(0)) & OFFSET_MASK) // std.cs
    std.put(">H", std.refcount_entry(data_cluster), 0)
    report = check_image(str(std.path))
    assert not report.ok
    assert any(f"cluster {data_cluster} " in m and "refcount=0 reference=1" in m for m in report.errors), report.render()


def test_check_reports_a_zeroed_refcount_block_pointer(std: Img) -> None:
    std.put(">Q", std.header.refcount_table_offset, 0)
    report = check_image(str(std.path))
    assert report.error_count >= 5, report.render()  # every cluster: refcount=0 reference=1


def test_check_reports_a_leaked_cluster(std: Img) -> None:
    end = std.file_size
    assert end % std.cs == 0
    std.put_bytes(end, b"\x5a" * std.cs)
    std.put(">H", std.refcount_entry(end // std.cs), 1)
    report = check_image(str(std.path))
    assert report.error_count == 0 and report.leak_count == 1, report.render()
    assert f"cluster {end // std.cs} " in report.leaks[0]


@pytest.mark.parametrize(
    "patch",
    [
        lambda img: img.put(">Q", img.header.refcount_table_offset, 1 << 40),
        lambda img: img.put(">Q", img.header.refcount_table_offset, img.refblock() | 0x100),
        lambda img: img.put(">Q", img.header.refcount_table_offset + 8, img.refblock()),
        lambda img: img.put(">Q", img.l2_entry(0), img.header.l1_table_offset | OFLAG_COPIED),
        lambda img: img.put(">Q", img.l2_entry(20 * KiB), img.get(">Q", img.l2_entry(0))),
        lambda img: img.put(">Q", img.l2_entry(16 * KiB), _compressed_descriptor(img, 1 << 40, 1)),
        lambda img: img.put(">Q", img.l1_entry(0), img.header.refcount_table_offset | OFLAG_COPIED),
    ],
    ids=["refblock-far", "reftable-reserved", "refblock-twice", "data-on-l1", "data-twice", "compressed-far", "l2-on-reftable"],
)
def test_check_reports_structural_errors(std: Img, patch: Callable[[Img], None]) -> None:
    patch(std)
    report = check_image(str(std.path))
    assert report.error_count, report.render()
    assert "errors were found" in report.render()


def test_check_valid_snapshots_sharing_l2_tables(tmp_path: Path) -> None:
    """Snapshots share L2 tables and data clusters legitimately: each shared
    cluster's refcount counts every L1 that reaches it (as QEMU counts)."""
    path = build(tmp_path / "snap.qcow2", cluster=512, writes=("write -q -P 1 0 8k", "write -q -c -P 2 40k 2k"))
    for n in range(3):
        _run("qemu-img", "snapshot", "-c", f"s{n}", path)
        _run("qemu-io", "-f", "qcow2", "-c", f"write -q -P {n + 3} {n}k 1k", path)
    _run("qemu-img", "check", path)
    report = check_image(str(path))
    assert report.ok, report.render()
    Img(path).put(">H", Img(path).refcount_entry(Img(path).l2_table(1) // 512), 1)  # was 4: L1 + 3 snapshots
    report = check_image(str(path))
    assert any("refcount=1 reference=4" in m for m in report.errors), report.render()


def test_check_many_snapshots_sharing_one_l1_is_fast(tmp_path: Path) -> None:
    """A small file whose snapshot table names the same L1 table (full of
    references to one L2 table) 800 times: the check must not walk that L2
    table 800 x 4096 times."""
    img = Img(build(tmp_path / "bomb.qcow2"))
    data = bytearray(img.data)
    l2 = img.l2_table()
    l1_entries = 4096
    l1_offset = len(data)
    data += struct.pack(">Q", l2 | OFLAG_COPIED) * l1_entries
    snap_offset = len(data)
    nb = 800
    for _ in range(nb):
        data += struct.pack(">QIHHIIQII", l1_offset, l1_entries, 0, 0, 0, 0, 0, 0, 0)
    data += bytes(-len(data) % 4096)
    img.path.write_bytes(bytes(data))
    img.set_field("nb_snapshots", nb)
    img.set_field("snapshots_offset", snap_offset)
    t0 = time.monotonic()
    report = check_image(str(img.path))
    assert time.monotonic() - t0 < 10
    assert not report.ok
    open_and_read(img.path)  # the active L1 is untouched: reads fine


def test_check_many_bitmaps_sharing_one_table_is_fast(tmp_path: Path) -> None:
    """A bitmap directory of 1000 bitmaps that all name one full bitmap
    table: the check must not walk that table 1000 times."""
    path = build(tmp_path / "bm.qcow2")
    _run("qemu-img", "bitmap", "--add", path, "b0")
    img = Img(path)
    assert img.header.bitmaps_ext is not None
    data = bytearray(img.data)
    data += bytes(-len(data) % 4096)
    table = len(data)
    data += struct.pack(">Q", 0x1000) * 512
    directory = len(data)
    for n in range(1000):
        name = f"b{n:03d}".encode()
        raw = struct.pack(">QIIBBHI", table, 512, 0, 1, 16, len(name), 0) + name
        data += raw + bytes(-len(raw) % 8)
    size = len(data) - directory
    data += bytes(-len(data) % 4096)
    img.path.write_bytes(bytes(data))
    # Point the bitmaps extension at the new directory.
    pos = img.header.header_length
    while img.get(">I", pos) != 0x23852875:
        pos += 8 + (img.get(">I", pos + 4) + 7) // 8 * 8
    img.put(">I", pos + 8, 1000)
    img.put(">Q", pos + 16, size)
    img.put(">Q", pos + 24, directory)
    t0 = time.monotonic()
    report = check_image(str(img.path))
    assert time.monotonic() - t0 < 10
    assert not report.ok


# -- hypothesis: random corruption of small valid images ---------------------------


@dataclass(frozen=True)
class Seed:
    """A small valid image (and its backing file) to corrupt."""

    name: str
    data: bytes = field(repr=False)
    cluster_size: int
    cluster_bits: int
    version: int
    # (start, end) ranges of the structures worth hitting.
    header: tuple[int, int]
    l1: tuple[int, int]
    l2: tuple[tuple[int, int], ...]
    refcounts: tuple[tuple[int, int], ...]
    compressed: tuple[tuple[int, int], ...]
    backing: tuple[str, bytes] | None = field(default=None, repr=False)


def _seed(name: str, path: Path, backing: Path | None = None) -> Seed:
    data = path.read_bytes()
    h = parse_header(str(path), data, len(data))
    cs = h.cluster_size
    img = Img(path)
    l2 = []
    for i in range(h.l1_size):
        off = img.l2_table(i)
        if off:
            l2.append((off, off + cs))
    refcounts = [(h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * cs)]
    reft = h.refcount_table_offset
    for i in range(h.refcount_table_clusters * cs // 8):
        off = img.get(">Q", reft + 8 * i) & ~0x1FF
        if off:
            refcounts.append((off, off + cs))
    compressed = []
    with Qcow2Layer(str(path)) as layer:
        for ext in layer.allocation():
            if ext.kind == 2:
                a, n = layer.compressed_span(ext.host)
                compressed.append((a, min(a + n, len(data))))
    assert compressed and l2, name
    return Seed(
        name=name,
        data=data,
        cluster_size=cs,
        cluster_bits=h.cluster_bits,
        version=h.version,
        header=(0, cs),
        l1=(h.l1_table_offset, h.l1_table_offset + h.l1_size * 8),
        l2=tuple(l2),
        refcounts=tuple(refcounts),
        compressed=tuple(compressed),
        backing=(backing.name, backing.read_bytes()) if backing else None,
    )


SEED_NAMES = ["v3-4k", "v3-512-backing", "v2-4k", "v3-16k-extl2-zstd", "v3-4k-snapshot-bitmap"]


class Seeds(dict[str, Seed]):
    """The seed images by name (short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return f"<seeds {sorted(self)}>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    """Five small images (7 to 100 KiB), each with data, zeros and a compressed cluster."""
    d = tmp_path_factory.mktemp("seeds")
    out = Seeds()
    out["v3-4k"] = _seed("v3-4k", build(d / "a.qcow2"))
    base = build(d / "base.qcow2", cluster=512, writes=("write -q -P 0x55 0 64k",))
    writes = ("write -q -P 0x11 0 1k", "write -q -z 2k 1k", "write -q -c -P 0x22 40k 1k")
    tip = build(d / "tip.qcow2", cluster=512, backing="base.qcow2", writes=writes)
    out["v3-512-backing"] = _seed("v3-512-backing", tip, backing=base)
    out["v2-4k"] = _seed("v2-4k", build(d / "v2.qcow2", opts=("compat=0.10",)))
    opts = ("extended_l2=on", "compression_type=zstd")
    writes = ("write -q -P 0x11 0 1k", "write -q -z 4k 2k", "write -q -P 0x33 6k 512", "write -q -c -P 0x22 32k 16k")
    out["v3-16k-extl2-zstd"] = _seed("v3-16k-extl2-zstd", build(d / "x.qcow2", cluster=16 * KiB, opts=opts, writes=writes))
    snap = build(d / "s.qcow2", writes=("write -q -P 0x11 0 8k", "write -q -c -P 0x22 16k 4k"))
    _run("qemu-img", "snapshot", "-c", "s1", snap)
    _run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x44 4k 4k", snap)
    _run("qemu-img", "bitmap", "--add", snap, "b0")
    out["v3-4k-snapshot-bitmap"] = _seed("v3-4k-snapshot-bitmap", snap)
    return out


READ_CHUNK = 1 * MiB
READ_BUDGET = 8 * MiB  # bytes read per example; a hostile size can claim terabytes
MEMORY_LIMIT = 200 * MiB


def _read_bounded(view: ChainView) -> None:
    """Read the whole disk if it is small, else what is allocated (capped)."""
    budget = READ_BUDGET
    if view.size <= 4 * MiB:
        ranges: list[tuple[int, int]] = [(0, view.size)]
    else:
        ranges = [(0, 64 * KiB), (view.size - 64 * KiB, view.size), *view.allocated_ranges()]
    for a, b in ranges:
        pos = a
        while pos < b and budget > 0:
            n = min(READ_CHUNK, b - pos, budget)
            got = view.read(pos, n)
            assert len(got) == n
            pos += n
            budget -= n


def _assert_names_a_file(e: ImageError) -> None:
    # Usually a file of the temporary directory, but a mutated backing name
    # may name any path (even "/"): only require that some file is named.
    assert e.path and str(e).startswith(f"{e.path}: ") and e.problem, str(e)


def exercise(tip: str) -> None:
    """Open, map, read and check an image: it works or raises ImageError.

    Any other exception propagates and fails the test; so does a peak of
    traced memory over MEMORY_LIMIT.
    """
    tracemalloc.start()
    try:
        try:
            with ChainView.open(tip) as view:
                entries = list(view.map())
                assert sum(e.length for e in entries) == view.size
                assert all(a.start + a.length == b.start for a, b in zip(entries, entries[1:]))
                for depth, layer in enumerate(view.layers):
                    describe_layer(layer, depth)
                _read_bounded(view)
        except ImageError as e:
            _assert_names_a_file(e)
        try:
            check_image(tip).render()
        except ImageError as e:
            _assert_names_a_file(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"peak of {peak} bytes traced"


def run_mutated(seed: Seed, data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="hostile-") as d:
        tip = os.path.join(d, "tip.qcow2")
        with open(tip, "wb") as f:
            f.write(data)
        if seed.backing is not None:
            with open(os.path.join(d, seed.backing[0]), "wb") as f:
                f.write(seed.backing[1])
        exercise(tip)


FUZZ = settings(
    # 30 x 40 tests: 1200 examples, ~25 s. HOSTILE_EXAMPLES=2000 for a long hunt.
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "30")),
    deadline=2000,  # ms per example; typical is ~10 ms
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def field_values(seed: Seed, fmt: str, original: int) -> st.SearchStrategy[int]:
    """Boundary and plausible values for one header field."""
    bits = struct.calcsize(fmt) * 8
    top = (1 << bits) - 1
    cs = seed.cluster_size
    n = len(seed.data)
    near = [0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 21, 22, 31, 32, 63, 64, 104, 112, 1023, 1024]
    near += [cs - 1, cs, cs + 1, 2 * cs, n - cs, n - 1, n, n + 1, n + cs, 1 << 31, 1 << 32, 1 << 63, top]
    candidates = sorted({v & top for v in near})
    return st.one_of(
        st.sampled_from(candidates),
        st.integers(0, top),
        st.integers(-4, 4).map(lambda d: (original + d) & top),
        st.integers(0, n // cs + 4).map(lambda k: (k * cs) & top),
        st.integers(0, bits - 1).map(lambda b: original ^ (1 << b)),
    )


def table_words(seed: Seed) -> st.SearchStrategy[int]:
    """Values for an L1/L2/refcount table entry: real-looking and hostile."""
    cs = seed.cluster_size
    n = len(seed.data)
    offsets = st.one_of(
        st.integers(0, n // cs + 4).map(lambda k: k * cs),
        st.integers(0, n + 4 * cs),
        st.sampled_from([OFFSET_MASK & ~(cs - 1), 1 << 40, 1 << 55]),
    )
    flags = st.sets(st.sampled_from([0, 1, 8, 9, 55, 56, 61, 62, 63])).map(lambda s: sum(1 << b for b in s))
    shift = 62 - (seed.cluster_bits - 8)
    compressed = st.builds(
        lambda off, sec: OFLAG_COMPRESSED | (sec << shift) | off,
        st.integers(0, n + cs),
        st.integers(0, (1 << (seed.cluster_bits - 8)) - 1),
    )
    return st.one_of(
        st.builds(lambda o, f: (o & OFFSET_MASK) | f, offsets, flags),
        compressed,
        st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, 1, OFLAG_COPIED, OFLAG_ZERO]),
    )


def overwrite(data: bytearray, region: tuple[int, int], draw: Callable, words: st.SearchStrategy[int]) -> None:
    """Overwrite a table word or a few random bytes inside ``region``."""
    a, b = region
    b = min(b, len(data))
    if b - a < 8:
        return
    if draw(st.booleans()):
        pos = a + 8 * draw(st.integers(0, (b - a) // 8 - 1))
        struct.pack_into(">Q", data, pos, draw(words))
    else:
        pos = draw(st.integers(a, b - 1))
        raw = draw(st.binary(min_size=1, max_size=min(16, b - pos)))
        data[pos : pos + len(raw)] = raw


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_header_fields(seeds: Seeds, name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    buf = bytearray(seed.data)
    names = FIELDS if seed.version == 3 else V2_FIELDS
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        field_name = data.draw(st.sampled_from(sorted(names)), label="field")
        offset, fmt = FIELDS[field_name]
        value = data.draw(field_values(seed, fmt, struct.unpack_from(fmt, buf, offset)[0]), label=field_name)
        struct.pack_into(fmt, buf, offset, value)
    run_mutated(seed, bytes(buf))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_header_bytes(seeds: Seeds, name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    buf = bytearray(seed.data)
    # Mostly the used part (header, extensions, backing name), sometimes anywhere.
    used = (0, 256) if data.draw(st.integers(0, 3)) else seed.header
    for _ in range(data.draw(st.integers(1, 4), label="patches")):
        pos = data.draw(st.integers(*used).map(lambda p: min(p, seed.header[1] - 1)), label="pos")
        raw = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        buf[pos : pos + len(raw)] = raw
    run_mutated(seed, bytes(buf))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@pytest.mark.parametrize("target", ["l1", "l2", "refcounts", "compressed"])
@FUZZ
@given(st.data())
def test_fuzz_tables(seeds: Seeds, name: str, target: str, data: st.DataObject) -> None:
    seed = seeds[name]
    buf = bytearray(seed.data)
    regions = {"l1": (seed.l1,), "l2": seed.l2, "refcounts": seed.refcounts, "compressed": seed.compressed}[target]
    words = table_words(seed)
    for _ in range(data.draw(st.integers(1, 4), label="patches")):
        region = data.draw(st.sampled_from(regions), label="region")
        overwrite(buf, region, data.draw, words)
    run_mutated(seed, bytes(buf))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_truncation(seeds: Seeds, name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    length = data.draw(
        st.one_of(
            st.integers(0, len(seed.data) - 1),
            st.integers(0, len(seed.data) // seed.cluster_size).map(lambda k: k * seed.cluster_size),
            st.integers(0, 200),
        ),
        label="length",
    )
    run_mutated(seed, seed.data[:length])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_everything(seeds: Seeds, name: str, data: st.DataObject) -> None:
    """Several kinds of damage at once, anywhere."""
    seed = seeds[name]
    buf = bytearray(seed.data)
    words = table_words(seed)
    regions = [seed.header, seed.l1, *seed.l2, *seed.refcounts, *seed.compressed, (0, len(buf))]
    for _ in range(data.draw(st.integers(1, 6), label="patches")):
        if data.draw(st.booleans(), label="field?"):
            field_name = data.draw(st.sampled_from(sorted(FIELDS if seed.version == 3 else V2_FIELDS)))
            offset, fmt = FIELDS[field_name]
            value = data.draw(field_values(seed, fmt, struct.unpack_from(fmt, buf, offset)[0]), label=field_name)
            struct.pack_into(fmt, buf, offset, value)
        else:
            overwrite(buf, data.draw(st.sampled_from(regions), label="region"), data.draw, words)
    if data.draw(st.booleans(), label="truncate?"):
        del buf[data.draw(st.integers(0, len(buf) - 1), label="length") :]
    run_mutated(seed, bytes(buf))


def test_seeds_are_valid(seeds: Seeds, tmp_path: Path) -> None:
    """The fuzzers start from images that read and check clean."""
    for seed in seeds.values():
        d = tmp_path / seed.name
        d.mkdir()
        (d / "tip.qcow2").write_bytes(seed.data)
        if seed.backing:
            (d / seed.backing[0]).write_bytes(seed.backing[1])
        open_and_read(d / "tip.qcow2")
        report = check_image(str(d / "tip.qcow2"))
        assert report.ok, report.render()
