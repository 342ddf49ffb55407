"""XFS extended attributes, which dissect.xfs does not read: the attribute fork of an inode.

The layout is the kernel's (fs/xfs/libxfs/xfs_da_format.h), read here
from the bytes, big-endian throughout:

- shortform (``di_aformat`` local): a 4-byte header (total size, count)
  and packed entries (name length, value length, flags, name, value),
  inside the inode;
- a leaf block (``di_aformat`` extents or btree, the fork's block 0 a leaf):
  a header, 8-byte entries (hash, offset of the name, flags), and the
  names with their values ("local") or with the block in the fork where
  the value is ("remote", for values too big for the leaf);
- a node block at block 0 when one leaf is not enough: the leaves are found
  by going down the first child of each node, then following the leaves'
  forward links, as the kernel's listxattr does.

Blocks of the fork are the filesystem's blocks, found through the fork's
extent list. CRC filesystems (v5) have the larger ``XFS_ATTR3`` headers
and a header in every block of a remote value; older ones (v4) have
neither. Only ``user`` attributes (neither the ROOT nor the SECURE flag,
nor the newer PARENT one, and not left INCOMPLETE by a crash) are
yielded. Any structure that does not add up raises ``XfsAttrDamaged``.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

from dissect.xfs.c_xfs import c_xfs
from dissect.xfs.xfs import fsb_to_bb, parse_fsblock

from engine.guest.guestfs import MAX_XATTR_BYTES

FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 1, 2, 3

ATTR_LOCAL = 0x01
ATTR_ROOT = 0x02
ATTR_SECURE = 0x04
ATTR_PARENT = 0x08
ATTR_INCOMPLETE = 0x80
NOT_USER = ATTR_ROOT | ATTR_SECURE | ATTR_PARENT | ATTR_INCOMPLETE

ATTR_LEAF_MAGIC, ATTR3_LEAF_MAGIC = 0xFBEE, 0x3BEE
DA_NODE_MAGIC, DA3_NODE_MAGIC = 0xFEBE, 0x3EBE
ATTR3_RMT_MAGIC = 0x5841524D  # "XARM"

# Header sizes, and where each header keeps its entry count.
LEAF_HEADER = {ATTR_LEAF_MAGIC: 32, ATTR3_LEAF_MAGIC: 80}
LEAF_COUNT_AT = {ATTR_LEAF_MAGIC: 12, ATTR3_LEAF_MAGIC: 56}
NODE_HEADER = {DA_NODE_MAGIC: 16, DA3_NODE_MAGIC: 64}
NODE_COUNT_AT = {DA_NODE_MAGIC: 12, DA3_NODE_MAGIC: 56}
RMT_HEADER = 56  # struct xfs_attr3_rmt_hdr, in every block of a remote value (v5 only)
MAX_DEPTH = 5  # XFS_DA_NODE_MAXDEPTH
MAX_FORK_EXTENTS = 1 << 20  # far above what an attribute fork holds; a bound on a crafted one


class XfsAttrDamaged(Exception):
    """An attribute fork whose structures do not add up."""


def user_attrs(node: Any) -> Iterator[tuple[str, bytes]]:
    """The ``user.*`` attributes of a dissect.xfs INode, as (name, value), in the fork's order.

    Lazy: a caller that stops early reads no further blocks. Values over
    MAX_XATTR_BYTES (the kernel's XATTR_SIZE_MAX, so never written by it)
    are left out without being read.
    """
    inode = node.inode
    if inode.di_forkoff == 0:
        return
    if inode.di_aformat == FMT_LOCAL:
        yield from _shortform(node.attrfork().read())
    elif inode.di_aformat in (FMT_EXTENTS, FMT_BTREE):
        fork = AttrFork(node)
        if fork.extents:
            yield from _blocks(fork)
    else:
        raise XfsAttrDamaged(f"attribute fork format {inode.di_aformat}")


def _user_name(flags: int, name: bytes) -> str | None:
    """The attribute's name as listxattr shows it, or None if it is not a user one."""
    if flags & NOT_USER:
        return None
    return os.fsdecode(b"user." + name)


def _shortform(raw: bytes) -> Iterator[tuple[str, bytes]]:
    """The entries of a shortform attribute fork (struct xfs_attr_shortform)."""
    if len(raw) < 4:
        raise XfsAttrDamaged("shortform attributes: no header")
    total, count = struct.unpack_from(">HB", raw, 0)
    if total > len(raw):
        raise XfsAttrDamaged(f"shortform attributes: {total} bytes in a fork of {len(raw)}")
    pos = 4
    for _ in range(count):
        if pos + 3 > total:
            raise XfsAttrDamaged("shortform attributes: an entry past the end")
        namelen, valuelen, flags = raw[pos], raw[pos + 1], raw[pos + 2]
        end = pos + 3 + namelen + valuelen
        if end > total:
            raise XfsAttrDamaged("shortform attributes: an entry past the end")
        name = _user_name(flags, raw[pos + 3:pos + 3 + namelen])
        if name is not None:
            yield name, raw[pos + 3 + namelen:end]
        pos = end


class AttrFork:
    """The blocks of an inode's attribute fork, by their number in the fork."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.fh = node.xfs.fh
        self.sb = node.xfs.sb
        self.block_size: int = node.xfs.block_size
        self.crc: bool = node.xfs.version == 5
        self.extents = sorted(self._extents())  # (first block in the fork, block on disk, count)
        self._starts = [e[0] for e in self.extents]

    def _extents(self) -> Iterator[tuple[int, int, int]]:
        if self.node.inode.di_aformat == FMT_EXTENTS:
            count = self.node.attr_extents
            raw = self.node.attrfork().read(count * 16)
            if len(raw) < count * 16:
                raise XfsAttrDamaged(f"{count} attribute fork extents in a smaller fork")
            records = (parse_fsblock(raw[i * 16:(i + 1) * 16]) for i in range(count))
        else:
            records = self._btree_records()
        for n, (offset, fsb, length, _unwritten) in enumerate(records):
            if n >= MAX_FORK_EXTENTS:
                raise XfsAttrDamaged("too many attribute fork extents")
            agnum, agblock = fsb_to_bb(fsb, self.sb.sb_agblklog)
            yield offset, agnum * self.sb.sb_agblocks + agblock, length

    def _btree_records(self) -> Iterator[tuple[int, int, int, int]]:
        """The extent records of a fork in btree format: its root is in the inode
        (struct xfs_bmdr_block, then keys, then pointers halfway through the fork)."""
        fork = self.node.attrfork()
        root = c_xfs.xfs_bmdr_block(fork)
        maxrecs = (fork.size - 4) // 16
        if root.bb_numrecs > maxrecs:
            raise XfsAttrDamaged(f"attribute btree root of {root.bb_numrecs} records, room for {maxrecs}")
        fork.seek(4 + maxrecs * 8)
        for pointer in c_xfs.uint64[root.bb_numrecs](fork):
            yield from self.node.ag.walk_extents(pointer)

    def block(self, number: int) -> bytes:
        """Block ``number`` of the fork."""
        i = bisect_right(self._starts, number) - 1
        if i < 0 or number >= self.extents[i][0] + self.extents[i][2]:
            raise XfsAttrDamaged(f"attribute fork block {number} is not mapped")
        first, disk, _ = self.extents[i]
        self.fh.seek((disk + number - first) * self.block_size)
        data = self.fh.read(self.block_size)
        if len(data) != self.block_size:
            raise XfsAttrDamaged(f"attribute fork block {number} is past the end of the volume")
        return data


def _blocks(fork: AttrFork) -> Iterator[tuple[str, bytes]]:
    """The attributes of a fork in leaf or node format: its leaves in order."""
    number = _first_leaf(fork)
    seen: set[int] = set()
    while True:
        if number in seen:
            raise XfsAttrDamaged(f"attribute leaf {number} links back into the chain")
        seen.add(number)
        leaf = fork.block(number)
        yield from _leaf(fork, leaf, number)
        number = struct.unpack_from(">I", leaf, 0)[0]  # forw
        if number == 0:
            return


def _first_leaf(fork: AttrFork) -> int:
    """The fork block of the first leaf: block 0, or down the first child of each node."""
    number = 0
    for _ in range(MAX_DEPTH + 1):
        block = fork.block(number)
        magic = struct.unpack_from(">H", block, 8)[0]
        if magic in LEAF_HEADER:
            return number
        if magic not in NODE_HEADER:
            raise XfsAttrDamaged(f"attribute block {number}: magic {magic:#x}")
        count = struct.unpack_from(">H", block, NODE_COUNT_AT[magic])[0]
        if count == 0 or NODE_HEADER[magic] + 8 > len(block):
            raise XfsAttrDamaged(f"attribute node {number} has no entries")
        number = struct.unpack_from(">I", block, NODE_HEADER[magic] + 4)[0]  # btree[0].before
    raise XfsAttrDamaged(f"attribute tree deeper than {MAX_DEPTH}")


def _leaf(fork: AttrFork, leaf: bytes, number: int) -> Iterator[tuple[str, bytes]]:
    """The user attributes of one leaf block (struct xfs_attr_leafblock or xfs_attr3_leafblock)."""
    magic = struct.unpack_from(">H", leaf, 8)[0]
    if magic not in LEAF_HEADER or (magic == ATTR3_LEAF_MAGIC) != fork.crc:
        raise XfsAttrDamaged(f"attribute block {number}: magic {magic:#x}, not a leaf")
    count = struct.unpack_from(">H", leaf, LEAF_COUNT_AT[magic])[0]
    names_start = LEAF_HEADER[magic] + 8 * count
    if names_start > len(leaf):
        raise XfsAttrDamaged(f"attribute leaf {number}: {count} entries do not fit")
    for i in range(count):
        _hash, nameidx, flags = struct.unpack_from(">IHB", leaf, LEAF_HEADER[magic] + 8 * i)
        if nameidx < names_start or nameidx >= len(leaf):
            raise XfsAttrDamaged(f"attribute leaf {number}: entry {i} points outside its names")
        if flags & ATTR_LOCAL:
            found = _local_entry(leaf, nameidx, flags)
        else:
            found = _remote_entry(fork, leaf, nameidx, flags)
        if found is not None:
            yield found


def _local_entry(leaf: bytes, at: int, flags: int) -> tuple[str, bytes] | None:
    """A name and its value in the leaf (struct xfs_attr_leaf_name_local)."""
    if at + 3 > len(leaf):
        raise XfsAttrDamaged("attribute leaf: a local entry past the block")
    valuelen, namelen = struct.unpack_from(">HB", leaf, at)
    end = at + 3 + namelen + valuelen
    if end > len(leaf):
        raise XfsAttrDamaged("attribute leaf: a local entry past the block")
    name = _user_name(flags, leaf[at + 3:at + 3 + namelen])
    return None if name is None else (name, leaf[at + 3 + namelen:end])


def _remote_entry(fork: AttrFork, leaf: bytes, at: int, flags: int) -> tuple[str, bytes] | None:
    """A name in the leaf whose value is in blocks of its own (struct xfs_attr_leaf_name_remote)."""
    if at + 9 > len(leaf):
        raise XfsAttrDamaged("attribute leaf: a remote entry past the block")
    valueblk, valuelen, namelen = struct.unpack_from(">IIB", leaf, at)
    if at + 9 + namelen > len(leaf):
        raise XfsAttrDamaged("attribute leaf: a remote entry past the block")
    name = _user_name(flags, leaf[at + 9:at + 9 + namelen])
    if name is None or valuelen > MAX_XATTR_BYTES:
        return None
    return name, _remote_value(fork, valueblk, valuelen)


def _remote_value(fork: AttrFork, first: int, length: int) -> bytes:
    """``length`` bytes of a value from fork block ``first`` on; on v5 each block
    starts with a header saying which bytes of the value it holds."""
    room = fork.block_size - (RMT_HEADER if fork.crc else 0)
    out = bytearray()
    number = first
    while len(out) < length:
        block = fork.block(number)
        take = min(room, length - len(out))
        if fork.crc:
            magic, offset, nbytes = struct.unpack_from(">III", block, 0)
            if magic != ATTR3_RMT_MAGIC or offset != len(out) or nbytes != take:
                raise XfsAttrDamaged(f"remote attribute value block {number}: header does not match")
            out += block[RMT_HEADER:RMT_HEADER + take]
        else:
            out += block[:take]
        number += 1
    return bytes(out)
