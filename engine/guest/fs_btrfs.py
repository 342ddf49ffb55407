"""Btrfs through dissect.btrfs: the default subvolume; other subvolumes
appear where the tree holds them, as directories (as a kernel mount shows them).

dissect.btrfs (1.10) trusts its B-tree nodes: a node with no items sends
its binary search round for ever without reading a byte (max_idx = -1),
and a node that points at itself (or a tree whose pointers all lead to
one child) is walked from its per-tree cache for ever, reading nothing
the work budget could count. Here each node is checked as it is read (it
lives where it says, holds at least one item and no more than fit, at a
level the format allows), a cursor goes down one level per step and at
most MAX_LEVELS deep, and one cursor visits at most as many nodes as the
filesystem can hold.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from dissect.btrfs import Btrfs
from dissect.btrfs import tree as dissect_tree

from engine.guest.btrfs_xattrs import xattr_items
from engine.guest.guestfs import FileData, GuestEntry, GuestFS, check_link, check_link_size, user_xattrs
from engine.guest.reader import DiskReader, GuestDamaged

MAX_LEVELS = 8  # BTRFS_MAX_LEVEL
HEADER_SIZE = 101
NODE_POINTER_SIZE = 33  # btrfs_key_ptr
LEAF_ITEM_SIZE = 25  # btrfs_item


def check_node(node: bytes, address: int, node_size: int) -> None:
    """Refuse a B-tree node the kernel would refuse, before dissect walks it."""
    if len(node) < node_size:
        raise GuestDamaged(f"btrfs: the B-tree node at {address} is cut short")
    bytenr, = struct.unpack_from("<Q", node, 48)
    nritems, level = struct.unpack_from("<IB", node, 96)
    if bytenr != address:
        raise GuestDamaged(f"btrfs: the B-tree node at {address} says it lives at {bytenr}")
    if level >= MAX_LEVELS:
        raise GuestDamaged(f"btrfs: a B-tree node of level {level}")
    fits = (node_size - HEADER_SIZE) // (NODE_POINTER_SIZE if level else LEAF_ITEM_SIZE)
    if not 0 < nritems <= fits:
        raise GuestDamaged(f"btrfs: a B-tree node of {nritems} items (0 or more than fit)")


class BoundedBtrfs(Btrfs):
    """dissect's Btrfs whose nodes are checked as they are read."""

    def _read_node(self, address: int) -> bytes:
        node = super()._read_node(address)
        check_node(node, address, self.node_size)
        return node


class BoundedCursor(dissect_tree.Cursor):
    """dissect's cursor, going down one level a step, at most so many nodes in all."""

    def push(self, address: int, initial_index: int = 0) -> None:
        parent_level = None if self._header is None else self._header.level
        self._pushes = getattr(self, "_pushes", 0) + 1
        fs = self.btree.btrfs
        if self._pushes > max(1024, fs.sb.total_bytes // max(fs.node_size, 1)):
            raise GuestDamaged("btrfs: a B-tree walk visits more nodes than the filesystem holds")
        if len(self._path) >= MAX_LEVELS:
            raise GuestDamaged("btrfs: a B-tree deeper than the format allows")
        super().push(address, initial_index)
        if parent_level is not None and self._header.level != parent_level - 1:
            raise GuestDamaged("btrfs: a B-tree node whose child is not one level below it")


def _bounded_cursor(self: dissect_tree.BTree) -> BoundedCursor:
    return BoundedCursor(self)


# dissect makes its BTree objects inside Btrfs, lazily, in several places:
# their cursor is the one place every walk goes through.
dissect_tree.BTree.cursor = _bounded_cursor  # type: ignore[method-assign]


class BtrfsVolume(GuestFS):
    kind = "btrfs"

    def __init__(self, reader: DiskReader) -> None:
        self.reader = reader
        self.fs = BoundedBtrfs(reader)
        self.label = self.fs.label

    def _entry(self, node) -> GuestEntry:  # type: ignore[no-untyped-def]
        i = node.inode
        return GuestEntry(
            key=(node.subvolume.objectid, node.inum), mode=i.mode, size=i.size, nlink=i.nlink,
            uid=i.uid, gid=i.gid, atime_ns=node.atime_ns, mtime_ns=node.mtime_ns, ctime_ns=node.ctime_ns,
            rdev=os.makedev((i.rdev >> 20) & 0xFFF, i.rdev & 0xFFFFF) if i.rdev else 0,
            blocks=i.nbytes // 512, ref=node,
        )

    def root(self) -> GuestEntry:
        return self._entry(self.fs.root)

    def children(self, entry: GuestEntry) -> Iterable[tuple[str, GuestEntry]]:
        for name, node in entry.ref.iterdir():
            if name in (".", ".."):
                continue
            yield name, self._entry(node)

    def readlink(self, entry: GuestEntry) -> bytes:
        check_link_size(entry.size, "btrfs symlink")
        return check_link(os.fsencode(entry.ref.link), "btrfs symlink")

    def xattrs(self, entry: GuestEntry) -> dict[bytes, bytes]:
        return user_xattrs(xattr_items(entry.ref))

    def data(self, entry: GuestEntry) -> FileData:
        # Extents may be compressed or inline: through the parser's stream.
        return FileData(entry.size, stream=entry.ref.open())
