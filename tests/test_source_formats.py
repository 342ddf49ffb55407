"""A source that holds a disk image format is refused with a hint, unless --raw.

A device reads its source as raw bytes: pointed at a VM's qcow2 (or VMDK,
VHD, VHDX, VDI) file, it would back up the container, not the disk. The
images here are QEMU's own (`qemu-img create`), so the signatures are the
ones users meet; a raw disk, partitioned or not, must still pass.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.imageformat import PROBE_BYTES, format_of_head, image_format
from engine.repo import Repository
from tests.commands import cli
from tests.oracle import qemu_img

MiB = 1024 * 1024

# (qemu-img create arguments, the format the refusal names)
IMAGES = [
    (["-f", "qcow2"], "qcow2"),
    (["-f", "vmdk"], "VMDK (sparse)"),
    (["-f", "vmdk", "-o", "subformat=monolithicFlat"], "VMDK (descriptor)"),
    (["-f", "vmdk", "-o", "subformat=streamOptimized"], "VMDK (sparse)"),
    (["-f", "vpc"], "VHD (dynamic)"),
    (["-f", "vpc", "-o", "subformat=fixed"], "VHD (fixed)"),
    (["-f", "vhdx"], "VHDX"),
    (["-f", "vdi"], "VDI"),
]


def _image(tmp_path: Path, args: list[str], size: str = "16M") -> Path:
    path = tmp_path / ("disk." + args[1] + ("-" + args[-1].split("=")[1] if "-o" in args else ""))
    qemu_img("create", "-q", *args, str(path), size)
    return path


@pytest.mark.parametrize("args,named", IMAGES, ids=[" ".join(a) for a, _ in IMAGES])
def test_an_image_format_is_refused_with_a_hint(repo: Repository, tmp_path: Path, args: list[str],
                                                named: str) -> None:
    path = _image(tmp_path, args)
    with pytest.raises(UsageError) as e:
        repo.add_device("vm1", str(path))
    message = str(e.value)
    assert f"source {path} is a {named} image, not a disk" in message, message
    assert f"qemu-img convert -O raw {path} disk.raw" in message and "--raw" in message, message
    assert "\n" not in message
    assert repo.devices() == [] and os.listdir(os.path.join(repo.path, "devices")) == []


def test_raw_disks_pass(repo: Repository, tmp_path: Path) -> None:
    """A plain raw disk, a GPT-partitioned one, and one whose data looks like
    a signature past the probed bytes or not at offset 0."""
    plain = tmp_path / "plain.raw"
    qemu_img("create", "-q", "-f", "raw", str(plain), "16M")
    gpt = tmp_path / "gpt.raw"
    qemu_img("create", "-q", "-f", "raw", str(gpt), "16M")
    subprocess.run(["sgdisk", "-n", "1:2048:+4M", "-n", "2:0:0", str(gpt)], check=True, capture_output=True)
    decoy = tmp_path / "decoy.raw"
    with open(decoy, "wb") as f:
        f.truncate(16 * MiB)
        f.write(b"\0" * 512 + b"QFI\xfb" + b"vhdxfile" + b"KDMV")  # a guest's data, not at offset 0
        f.seek(PROBE_BYTES)
        f.write(b"# Disk DescriptorFile\n")  # past what is read: not looked at
    for name, path in (("plain", plain), ("gpt", gpt), ("decoy", decoy)):
        rec = repo.add_device(name, str(path))
        assert rec.size == 16 * MiB


def test_raw_takes_the_bytes_and_replace_checks_too(tmp_path: Path) -> None:
    """--raw on add and on --replace; a --replace by an image is refused like an add."""
    repo = tmp_path / "repo"
    Repository.init(str(repo))
    fixed = _image(tmp_path, ["-f", "vpc", "-o", "subformat=fixed"])  # 16 MiB + a 512-byte footer
    proc = cli("device", "add", repo, "vm1", fixed, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "is a VHD (fixed) image, not a disk" in err, err
    out = cli("device", "add", repo, "vm1", fixed, "--raw").stdout.decode()
    assert out.startswith(f"device vm1: {fixed}, ")
    other = tmp_path / "other.vpc"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(other), "16M")
    with Repository.open(str(repo)) as r:
        with pytest.raises(UsageError, match="is a VHD \\(fixed\\) image, not a disk"):
            r.replace_source("vm1", str(other))
        assert r.device_record("vm1").source == str(fixed)  # still bound to the first
    cli("device", "add", repo, "vm1", other, "--replace", "--raw")
    with Repository.open(str(repo)) as r:
        assert r.device_record("vm1").source == str(other)


def test_import_source_is_checked(repo: Repository, tmp_path: Path) -> None:
    """`import --source`: the live disk that goes on from the chain is a source too."""
    live = _image(tmp_path, ["-f", "vpc", "-o", "subformat=fixed"])
    base = tmp_path / "chain" / "base.qcow2"
    base.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(os.path.getsize(live)))
    with pytest.raises(UsageError, match="is a VHD \\(fixed\\) image, not a disk"):
        repo.import_chain("vm1", str(base), source=str(live))
    assert repo.devices() == [] and os.listdir(os.path.join(repo.path, "devices")) == []
    repo.import_chain("vm1", str(base), source=str(live), raw_source=True)  # asked for: the bytes
    assert repo.device_record("vm1").source == str(live)


def test_a_fixed_vhd_is_told_by_its_last_sector(tmp_path: Path) -> None:
    """An 8 GiB sparse file with a VHD footer in its last sector and nothing at
    its start; then the same footer one sector earlier: not a footer."""
    path = tmp_path / "big.raw"
    footer = bytearray(b"conectix" + b"\0" * 504)
    footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)  # its checksum (a cookie alone is not one)
    with open(path, "wb") as f:
        f.truncate(8 << 30)
        f.seek((8 << 30) - 512)
        f.write(footer)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert image_format(fd, 8 << 30) == "VHD (fixed)"
        assert image_format(fd, (8 << 30) - 512) is None  # as if the disk ended a sector earlier
    finally:
        os.close(fd)
    assert format_of_head(b"") is None and format_of_head(b"\0" * PROBE_BYTES) is None


@pytest.mark.mount
def test_a_block_device_is_checked_the_same_way(repo: Repository, tmp_path: Path) -> None:
    """A loop device over a qcow2 file (as an LV holding a qcow2 image would be)."""
    image = _image(tmp_path, ["-f", "qcow2"])
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        with pytest.raises(UsageError, match=f"source {loop} is a qcow2 image, not a disk"):
            repo.add_device("vm1", loop)
        assert repo.add_device("vm1", loop, raw=True).source == loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
