"""Where an ext2/3/4 inode's blocks are, read with bounds a crafted inode cannot get round.

dissect.extfs (3.15) builds a file's runlist from its block map as one
list entry per block, holes included: an ext2 inode whose i_size says
2^40 makes a list of a billion entries (gigabytes) before anything is
read; its extent walk follows index blocks without a depth limit, so an
index that points to itself recurses until Python stops it. Here the
same runlists are built with

- holes kept as one run each, however long (memory follows what is
  allocated, not what i_size claims);
- at most as many blocks read and mapped as the filesystem has (a map or
  an extent tree that points back into itself ends there, as damage);
- an extent tree at most five levels deep, each level one less than its
  parent (as the kernel checks it).

``BoundedExtFS`` is dissect's ExtFS whose inodes use these runlists, so
directories, symlinks and xattr inodes read through the parser get them
too, and whose superblock's block size is checked before it is used.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from dissect.extfs import extfs as dissect_extfs
from dissect.extfs.c_ext import c_ext

from engine.guest.reader import GuestDamaged

MAX_EXTENT_DEPTH = 5  # the kernel's EXT4_MAX_EXTENT_DEPTH
MAX_LOG_BLOCK_SIZE = 6  # 64 KiB blocks, the largest the kernel mounts
EXTENT_MAGIC = 0xF30A
UNINITIALIZED = 0x8000  # an ee_len above this is an unwritten extent of (ee_len - 0x8000) blocks

Runs = list[tuple[int | None, int]]  # (first block or None for a hole, blocks)


class _Mapper:
    """Builds one inode's runlist, spending at most ``limit`` block reads and mapped blocks."""

    def __init__(self, node: dissect_extfs.INode) -> None:
        self.fs = node.extfs
        self.node = node
        self.block_size = self.fs.block_size
        self.blocks = (node.size + self.block_size - 1) // self.block_size
        self.left = max(16, self.fs.block_count)
        self.runs: Runs = []

    def spend(self, what: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise GuestDamaged(f"inode {self.node.inum}: its {what} maps more blocks than the filesystem has")

    def add(self, block: int | None, count: int) -> None:
        """Append a run, merged with the last one where they continue each other."""
        if count <= 0:
            return
        if self.runs:
            last, n = self.runs[-1]
            if (last is None and block is None) or (last is not None and block == last + n):
                self.runs[-1] = (last, n + count)
                return
        self.runs.append((block, count))

    def read_block(self, block: int) -> bytes:
        self.fs.fh.seek(block * self.block_size)
        return self.fs.fh.read(self.block_size)


def _block_map(m: _Mapper) -> Runs:
    """ext2/3 block maps: 12 direct pointers, then single, double and triple indirect blocks."""
    pointers = struct.unpack("<15I", bytes(m.node.inode.i_block))
    per_block = m.block_size // 4
    left = m.blocks
    for p in pointers[:12]:
        if left <= 0:
            break
        m.add(p or None, 1)
        if p:
            m.spend("block map")
        left -= 1
    for level, p in enumerate(pointers[12:15], 1):
        if left <= 0:
            break
        take = min(left, per_block**level)
        _indirect(m, p, level, take, per_block)
        left -= take
    return m.runs


def _indirect(m: _Mapper, block: int, level: int, count: int, per_block: int) -> None:
    """``count`` blocks mapped by an indirect block of ``level`` (1: it lists data blocks)."""
    if block == 0:
        m.add(None, count)
        return
    m.spend("block map")
    if level == 0:
        m.add(block, 1)
        return
    if block > m.fs.last_block:
        raise GuestDamaged(f"inode {m.node.inum}: an indirect block past the filesystem's end")
    raw = m.read_block(block)
    if len(raw) < m.block_size:
        raise GuestDamaged(f"inode {m.node.inum}: an indirect block cut short")
    span = per_block ** (level - 1)
    for p in struct.unpack(f"<{per_block}I", raw):
        if count <= 0:
            break
        take = min(count, span)
        _indirect(m, p, level - 1, take, per_block)
        count -= take


def _extents(m: _Mapper) -> Runs:
    """An extent tree: leaves in logical order, holes between them, the tail up to i_size a hole."""
    pos = _extent_node(m, bytes(m.node.inode.i_block), MAX_EXTENT_DEPTH, 0)
    if pos < m.blocks:
        m.add(None, m.blocks - pos)
    return m.runs


def _extent_node(m: _Mapper, raw: bytes, max_depth: int, pos: int) -> int:
    """Map the extents under one node; returns the logical block reached."""
    magic, entries, _, depth = struct.unpack_from("<HHHH", raw, 0)
    if magic != EXTENT_MAGIC:
        raise GuestDamaged(f"inode {m.node.inum}: an extent node without its magic")
    if depth > max_depth:
        raise GuestDamaged(f"inode {m.node.inum}: an extent tree deeper than it may be")
    entries = min(entries, (len(raw) - 12) // 12)
    for i in range(entries):
        if pos >= m.blocks:
            break
        at = 12 + 12 * i
        if depth:
            _, leaf_lo, leaf_hi = struct.unpack_from("<IIH", raw, at)
            child = leaf_hi << 32 | leaf_lo
            m.spend("extent tree")
            if child > m.fs.last_block:
                raise GuestDamaged(f"inode {m.node.inum}: an extent index past the filesystem's end")
            pos = _extent_node(m, m.read_block(child), depth - 1, pos)
            continue
        first, length, start_hi, start_lo = struct.unpack_from("<IHHI", raw, at)
        written = length <= UNINITIALIZED
        length = length if written else length - UNINITIALIZED
        if first < pos:
            raise GuestDamaged(f"inode {m.node.inum}: extents overlap or are out of order")
        m.add(None, first - pos)
        m.add((start_hi << 32 | start_lo) if written else None, length)
        if written:
            m.spend("extent tree")
        pos = first + length
    return pos


def inode_runs(node: dissect_extfs.INode) -> Runs:
    """The runlist of an inode, in blocks, bounded (see the module docstring)."""
    m = _Mapper(node)
    if node.inode.i_flags & c_ext.EXT4_EXTENTS_FL:
        return _extents(m)
    return _block_map(m)


class BoundedINode(dissect_extfs.INode):
    """dissect's inode with the bounded runlist."""

    def dataruns(self) -> Runs:
        if not self._runlist:
            self._runlist = inode_runs(self)
        return self._runlist


class BoundedExtFS(dissect_extfs.ExtFS):
    """dissect's ExtFS whose inodes are ``BoundedINode``, and whose block
    size is checked before dissect computes it (``1024 << s_log_block_size``:
    a crafted exponent of 2^31 makes an integer of gigabytes)."""

    def __init__(self, fh: BinaryIO) -> None:
        fh.seek(c_ext.EXT2_SBOFF + 24)
        log_block, = struct.unpack("<I", fh.read(4).ljust(4, b"\0"))
        if log_block > MAX_LOG_BLOCK_SIZE:
            raise GuestDamaged(f"ext superblock: a block size of 1024 << {log_block}")
        super().__init__(fh)

    def get_inode(self, inum: int, filename: str | None = None, filetype: int | None = None) -> BoundedINode:
        if inum < c_ext.EXT2_BAD_INO or inum > self.sb.s_inodes_count:
            raise GuestDamaged(f"inode number {inum} out of range")
        return BoundedINode(self, inum, filename, filetype)
