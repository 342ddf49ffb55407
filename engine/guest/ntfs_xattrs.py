"""NTFS "extended attributes" as ntfs-3g shows them: named data streams.

ntfs-3g (what writes NTFS from Linux) keeps ``user.NAME`` as the named
$DATA stream NAME of the file or directory (its default
``streams_interface=xattr``), and lists every named stream, also those
Windows wrote (``Zone.Identifier``), as ``user.<stream name>``. So does
this module.

NTFS's own extended attributes ($EA, which ntfs-3g writes only when asked
through ``system.ntfs_ea``) are not shown: ntfs-3g lists none of them as
``user.*``, and the Linux view is the one this follows.

A stream over MAX_XATTR_BYTES (the kernel's XATTR_SIZE_MAX: Windows can
write any size, Linux cannot read such an attribute) is left out unread; a
name that is not valid UTF-16, or holds NUL, is left out too (ntfs-3g
cannot convert it either).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE
from dissect.ntfs.util import AttributeCollection

from engine.guest.guestfs import MAX_XATTR_BYTES


class NtfsStreamDamaged(Exception):
    """A named stream shorter than its recorded size."""


def stream_xattrs(rec: Any) -> Iterator[tuple[str, bytes]]:
    """The named $DATA streams of a dissect.ntfs MftRecord as (``user.`` + name, bytes).

    A stream kept in several attribute records (a large, fragmented one,
    through $ATTRIBUTE_LIST) is one stream: its records are read together.
    Lazy: a caller that stops early reads no further streams.
    """
    streams: dict[str, list[Any]] = {}
    for attr in rec.attributes[ATTRIBUTE_TYPE_CODE.DATA]:
        try:
            name = attr.header.name
        except UnicodeDecodeError:
            continue
        if name and "\0" not in name:
            streams.setdefault(name, []).append(attr)
    for name, parts in streams.items():
        stream = AttributeCollection(parts)
        size = stream.size()
        if size > MAX_XATTR_BYTES:
            continue
        value = stream.open().read(size)
        if len(value) != size:
            raise NtfsStreamDamaged(f"stream {name!r}: {len(value)} of {size} bytes")
        yield "user." + name, value
