"""Hostile qcow2 headers: magic, version, cluster size, encryption, feature
bits, header length and extensions, each refused with one clear ImageError
(tests/hostile_qcow2.py says what every hostile-input test requires)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.errors import UsageError
from engine.qcow2.check import check_image
from engine.qcow2.format import EXT_CRYPTO, OFLAG_ZERO
from engine.qcow2.info import describe_layer
from engine.qcow2.layers import Qcow2Layer, open_layer
from engine.repo import Repository

from tests.commands import cli
from tests.hostile_qcow2 import build, Img, open_and_read, refused
from tests.oracle import qemu_raw

KiB = 1024
MiB = 1024 * KiB


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
