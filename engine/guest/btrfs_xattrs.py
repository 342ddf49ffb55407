"""Btrfs extended attributes, which dissect.btrfs does not read.

Each attribute of an inode is an XATTR_ITEM (key type 24) in its
subvolume's tree, keyed (inode, 24, crc32c hash of the full name). The item
holds a ``struct btrfs_dir_item`` (location key, transid, data_len,
name_len, type) followed by the name and the value; names whose hashes
collide share one item, their dir_items one after another. Names are
stored whole, namespace included ("user.comment"), as listxattr shows them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

XATTR_ITEM_KEY = 24  # BTRFS_XATTR_ITEM_KEY
# struct btrfs_dir_item before its name: location key (17), transid (8), data_len, name_len, type.
DIR_ITEM = struct.Struct("<17s8sHHB")


class BtrfsXattrDamaged(Exception):
    """An XATTR_ITEM whose entries do not fit in it."""


def xattr_items(node: Any) -> Iterator[tuple[str, bytes]]:
    """Every extended attribute of a dissect.btrfs INode, as (full name, value), in
    key order. Lazy: a caller that stops early reads no further tree blocks."""
    cursor = node.subvolume.tree.cursor()
    for _item, data in cursor.iter(node.inum, XATTR_ITEM_KEY, 0, ignore_offset=True):
        yield from _dir_items(bytes(data), node.inum)


def _dir_items(raw: bytes, inum: int) -> Iterator[tuple[str, bytes]]:
    """The (name, value) pairs of one item's dir_items."""
    pos = 0
    while pos < len(raw):
        if pos + DIR_ITEM.size > len(raw):
            raise BtrfsXattrDamaged(f"xattr item of inode {inum}: a truncated entry")
        _location, _transid, data_len, name_len, _type = DIR_ITEM.unpack_from(raw, pos)
        name_at = pos + DIR_ITEM.size
        pos = name_at + name_len + data_len
        if pos > len(raw):
            raise BtrfsXattrDamaged(f"xattr item of inode {inum}: an entry past the item")
        yield os.fsdecode(raw[name_at:name_at + name_len]), raw[name_at + name_len:pos]
