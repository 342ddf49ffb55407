"""Is a would-be source a disk image format rather than a disk?

A device's source is read as raw bytes: the guest's disk, sector by
sector. Given a qcow2, VMDK, VHD(X), VDI, QED or Parallels file instead, backupfs would
faithfully back up the container's bytes (its headers, tables and,
for a sparse image, a fraction of the disk), and every backup would
restore as something no VM or loop device reads as that disk. Users
do this by mistake (the VM's disk file is the obvious thing to point
at), so such a source is refused with a hint, unless the caller says
the bytes themselves are wanted (``--raw``: an image file kept as an
opaque blob, say).

Told from magic numbers, as qemu's format probes do, reading at most
PROBE_BYTES at the start and one sector at the end (where a fixed VHD
keeps its only footer). A raw disk holds whatever its guest wrote, so a
short magic alone is not enough where the format gives more to check: a
VHD footer must carry its checksum, a qcow header a version qcow has. A block device is checked the same way: an
LV or a LUN can hold a qcow2 image (oVirt does that).
"""

from __future__ import annotations

import os
import shlex
import struct

from engine.errors import UsageError

PROBE_BYTES = 4096  # every signature below lies in the first KiB; a page is one read
FOOTER_BYTES = 512  # a VHD footer: the last sector

VDI_SIGNATURE = 0xBEDA107F  # little-endian u32 at 0x40, after the 64-byte text pre-header
VDI_TEXT = b"Disk Image"  # "<<< Oracle VM VirtualBox Disk Image >>>", "<<< QEMU VM Virtual Disk Image >>>"
VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
QCOW_VERSIONS = {1: "qcow", 2: "qcow2", 3: "qcow2"}
PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")


def image_format(fd: int, size: int) -> str | None:
    """The image format whose signature the file or device at ``fd`` (of
    ``size`` bytes) carries, e.g. ``"qcow2"``, or None for what may be a
    raw disk. Reads with pread: the descriptor's offset is left alone."""
    head = os.pread(fd, min(PROBE_BYTES, size), 0)
    found = format_of_head(head)
    if found is not None:
        return found
    if size >= FOOTER_BYTES:
        tail = os.pread(fd, FOOTER_BYTES, size - FOOTER_BYTES)
        if _vhd_footer(tail):
            return "VHD (fixed)"
    return None


def format_of_head(head: bytes) -> str | None:
    """The format a file's first bytes name (see ``image_format``), or None."""
    if head.startswith(b"QFI\xfb") and len(head) >= 8:
        return QCOW_VERSIONS.get(struct.unpack(">I", head[4:8])[0])
    if head.startswith(b"QED\0"):
        return "QED"
    if head.startswith(PARALLELS_MAGICS):
        return "Parallels"
    if head.startswith(b"KDMV"):
        return "VMDK (sparse)"
    if head.startswith(b"COWD"):
        return "VMDK (ESX sparse)"
    if head.lstrip(b" \t\r\n").startswith(VMDK_DESCRIPTOR):
        return "VMDK (descriptor)"
    if head.startswith(b"vhdxfile"):
        return "VHDX"
    if _vhd_footer(head[:FOOTER_BYTES]):  # a dynamic VHD's copy of its footer
        return "VHD (dynamic)"
    if (len(head) >= 0x44 and head.startswith(b"<<< ") and VDI_TEXT in head[:0x40]
            and struct.unpack("<I", head[0x40:0x44])[0] == VDI_SIGNATURE):
        return "VDI"
    return None


def _vhd_footer(sector: bytes) -> bool:
    """Is ``sector`` a VHD footer: its cookie, and the checksum over it (the
    one's complement of the sum of its bytes but the checksum's own four)?"""
    if len(sector) < FOOTER_BYTES or not sector.startswith(b"conectix"):
        return False
    footer = sector[:FOOTER_BYTES]
    (checksum,) = struct.unpack(">I", footer[64:68])
    return (~(sum(footer) - sum(footer[64:68]))) & 0xFFFFFFFF == checksum


def refuse_image_format(fd: int, size: int, path: str) -> None:
    """Refuse a source that holds an image format, with what to do instead."""
    found = image_format(fd, size)
    if found is None:
        return
    raise UsageError(
        f"source {path} is a {found} image, not a disk: a device reads its source as raw bytes. "
        f"Convert it ('qemu-img convert -O raw {shlex.quote(path)} disk.raw') or give the raw disk or block "
        f"device, or add --raw to back up the file's own bytes"
    )
