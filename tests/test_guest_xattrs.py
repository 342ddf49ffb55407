"""`user.*` extended attributes of XFS, Btrfs and NTFS guests, as the kernel shows them.

Dissect reads none of them; engine/guest/xfs_attrs.py, btrfs_xattrs.py and
ntfs_xattrs.py do. Images are made by the real tools and filled through a
loop mount (so every test here is marked `mount`), then read by the engine
and compared with what was put in and with the host kernel's view (ntfs-3g's
for NTFS). The XFS cases check that the image really holds the on-disk
format they are about (shortform, leaf, node, remote values, a btree fork),
so that a change in mkfs or the kernel cannot make them test less quietly.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dissect.btrfs import Btrfs
from dissect.util.hash import crc32c
from dissect.xfs import XFS

from engine.guest.btrfs_xattrs import XATTR_ITEM_KEY
from engine.guest.guestdisk import GuestDisk
from engine.guest.guestfs import MAX_XATTR_BYTES
from engine.guest.reader import GuestDamaged
from engine.guest.xfs_attrs import ATTR3_LEAF_MAGIC, DA3_NODE_MAGIC, FMT_BTREE, FMT_EXTENTS, FMT_LOCAL, AttrFork
from tests.guestengine import FileSource, engine_view
from tests.guestfs import kernel_view, loop_device, make_fs, mounted, run
from tests.guesttree import Dir, TreeSpec, View, default_tree, differences, expected_view, plain

pytestmark = pytest.mark.mount

KiB = 1024


def assert_same(expected: View, actual: View) -> None:
    """Views equal, or the test fails naming every difference."""
    lines = differences(expected, actual)
    assert not lines, "\n".join(lines)


def read_engine_view(image: Path, fstype: str) -> View:
    """The whole filesystem of ``image`` as the engine shows it; the image file closed after."""
    source = FileSource(image)
    with GuestDisk(source, on_close=source.close) as disk:
        return engine_view(disk.volume("disk"), fstype)


def engine_xattrs(image: Path, path: str) -> dict[bytes, bytes]:
    """One entry's `user.*` attributes as the engine reads them (GuestDamaged if it cannot)."""
    source = FileSource(image)
    with GuestDisk(source, on_close=source.close) as disk:
        return disk.volume("disk").xattrs(tuple(os.fsencode(p) for p in path.split("/")))


def numbered(count: int, size: int, prefix: str = "user.attr") -> tuple[tuple[str, bytes], ...]:
    """``count`` attributes of ``size`` bytes each, each value different."""
    return tuple((f"{prefix}{i:04d}", bytes([i % 251]) * size + i.to_bytes(2, "big")) for i in range(count))


def random_bytes(size: int, seed: int) -> bytes:
    return bytes((seed * 7919 + i * 104729) % 251 for i in range(size))


# ------------------------------------------------------------------ every filesystem


@pytest.mark.parametrize("fstype", ["xfs", "btrfs", "ntfs"])
def test_default_tree_xattrs_as_put_in(fstype: str, tmp_path: Path) -> None:
    """The default tree's attributes (on a file, its hard link, a directory; empty and binary values)."""
    spec = default_tree()
    image = make_fs(fstype, tmp_path, spec)
    view = read_engine_view(image, fstype)
    assert view.entries["home/alice/notes.txt"].xattrs, "the tree has attributes to show"
    assert_same(expected_view(spec, fstype), view)


# ------------------------------------------------------------------------------- XFS


def xfs_forks(image: Path, names: list[str]) -> dict[str, tuple[int, int | None]]:
    """Each file's attribute fork format, and the magic of its fork's block 0 (None when in the inode)."""
    with open(image, "rb") as f:
        fs = XFS(f)
        out: dict[str, tuple[int, int | None]] = {}
        for name in names:
            node = fs.get(name)
            magic = None
            if node.inode.di_aformat != FMT_LOCAL:
                magic = struct.unpack_from(">H", AttrFork(node).block(0), 8)[0]
            out[name] = (node.inode.di_aformat, magic)
        return out


def big_xfs_spec() -> TreeSpec:
    return TreeSpec((
        plain("shortform", b"s", xattrs=(("user.a", b"1"), ("user.b", b""))),
        plain("leaf", b"l", xattrs=numbered(30, 50)),
        plain("remote", b"r", xattrs=(("user.big", random_bytes(20 * KiB, 1)),
                                      ("user.max", random_bytes(MAX_XATTR_BYTES, 2)), ("user.small", b"s"))),
        plain("node", b"n", xattrs=numbered(600, 40) + (("user.remote", random_bytes(9000, 3)),)),
        Dir(path="dir", xattrs=numbered(100, 100)),
    ))


def test_xfs_leaf_node_and_remote_attributes(tmp_path: Path) -> None:
    """Attributes that outgrow the inode: one leaf, remote values (up to XATTR_SIZE_MAX, so
    over many blocks), a node over many leaves; trusted.* and security.* ones left out."""
    spec = big_xfs_spec()
    image = make_fs("xfs", tmp_path, spec)
    with mounted(image, "xfs") as where:
        for name in ("shortform", "leaf", "node"):
            os.setxattr(where / name, "trusted.hidden", b"root only")
            os.setxattr(where / name, "security.hidden", b"a label")
    forks = xfs_forks(image, ["shortform", "leaf", "remote", "node", "dir"])
    assert forks == {"shortform": (FMT_LOCAL, None), "leaf": (FMT_EXTENTS, ATTR3_LEAF_MAGIC),
                     "remote": (FMT_EXTENTS, ATTR3_LEAF_MAGIC), "node": (FMT_EXTENTS, DA3_NODE_MAGIC),
                     "dir": (FMT_EXTENTS, DA3_NODE_MAGIC)}
    view = read_engine_view(image, "xfs")
    assert_same(expected_view(spec, "xfs"), view)
    assert_same(kernel_view(image, 0, "xfs"), view)


def test_xfs_attribute_fork_in_btree_format(tmp_path: Path) -> None:
    """A fork of more extents than the inode holds: its extent list is a btree.

    Each remote value is written, then a file's block is made to land right
    after it (fsync allocates it now), so the fork's blocks are never adjacent."""
    image = make_fs("xfs", tmp_path, TreeSpec((plain("fragmented", b"f"),)))
    with mounted(image, "xfs") as where:
        for i in range(24):
            os.setxattr(where / "fragmented", f"user.v{i:03d}", bytes([i]) * 5000)
            fd = os.open(where / f"filler{i:03d}", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"f" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
    assert xfs_forks(image, ["fragmented"])["fragmented"][0] == FMT_BTREE
    view = read_engine_view(image, "xfs")
    assert len(view.entries["fragmented"].xattrs or ()) == 24
    assert_same(kernel_view(image, 0, "xfs"), view)


def overwrite(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_xfs_damaged_attribute_blocks_raise(tmp_path: Path) -> None:
    """A leaf with a wrong magic, a remote value block whose header lies: EIO for that file only."""
    image = make_fs("xfs", tmp_path, big_xfs_spec())
    with open(image, "rb") as f:
        fs = XFS(f)
        leaf_fork = AttrFork(fs.get("leaf"))
        remote_fork = AttrFork(fs.get("remote"))
        leaf_at = leaf_fork.extents[0][1] * leaf_fork.block_size
        remote_at = remote_fork.extents[-1][1] * remote_fork.block_size  # a block of a remote value
    assert engine_xattrs(image, "leaf") and engine_xattrs(image, "remote")
    overwrite(image, leaf_at + 8, b"\x12\x34")
    overwrite(image, remote_at + 4, b"\xff\xff\xff\xff")  # rm_offset
    for path in ("leaf", "remote"):
        with pytest.raises(GuestDamaged):
            engine_xattrs(image, path)
    assert engine_xattrs(image, "shortform") == {b"user.a": b"1", b"user.b": b""}


# ----------------------------------------------------------------------------- Btrfs


def btrfs_name_hash(name: str) -> int:
    """The key offset of an XATTR_ITEM: the kernel's crc32c(~1, name), no final inversion."""
    return (crc32c.update(1, name.encode()) ^ 0xFFFFFFFF) & 0xFFFFFFFF


# Two names with one hash (found by a search over random names): one item holds both.
COLLIDING = ("user.fzsbmxjufv", "user.idfrecbbia")


def btrfs_xattr_item_count(image: Path, path: str) -> int:
    with open(image, "rb") as f:
        node = Btrfs(f).get(path)
        return sum(1 for _ in node.subvolume.tree.cursor().iter(node.inum, XATTR_ITEM_KEY, 0, ignore_offset=True))


def test_btrfs_many_large_and_colliding_names(tmp_path: Path) -> None:
    """Hundreds of attributes, a value of 10 KiB, two names sharing one item; trusted.* left out."""
    assert btrfs_name_hash(COLLIDING[0]) == btrfs_name_hash(COLLIDING[1])
    spec = TreeSpec((
        plain("many", b"m", xattrs=numbered(300, 30)),
        plain("large", b"l", xattrs=(("user.large", random_bytes(10 * KiB, 4)),)),
        plain("collide", b"c", xattrs=((COLLIDING[0], b"first"), (COLLIDING[1], b"second"))),
        Dir(path="dir", xattrs=numbered(20, 10)),
    ))
    image = make_fs("btrfs", tmp_path, spec)
    with mounted(image, "btrfs") as where:
        os.setxattr(where / "collide", "trusted.hidden", b"root only")
    assert btrfs_xattr_item_count(image, "collide") == 2  # three names: two in one item
    view = read_engine_view(image, "btrfs")
    assert_same(expected_view(spec, "btrfs"), view)
    assert_same(kernel_view(image, 0, "btrfs"), view)


def test_btrfs_damaged_xattr_item_raises(tmp_path: Path) -> None:
    """A dir_item whose name runs past its item: EIO for that file, the others still read."""
    name = b"user.unique-marker-name"
    image = make_fs("btrfs", tmp_path, TreeSpec((plain("damaged", b"d", xattrs=((name.decode(), b"v"),)),
                                                 plain("intact", b"i", xattrs=(("user.ok", b"yes"),)))))
    raw = image.read_bytes()
    hits = []
    at = raw.find(name)
    while at >= 0:
        hits.append(at)
        at = raw.find(name, at + 1)
    assert hits, "the attribute's name is in the image"
    for at in hits:  # every copy (metadata is DUP): name_len is the 2 bytes before the type byte
        overwrite(image, at - 3, b"\xff\x7f")
    with pytest.raises(GuestDamaged):
        engine_xattrs(image, "damaged")
    assert engine_xattrs(image, "intact") == {b"user.ok": b"yes"}


# ------------------------------------------------------------------------------ NTFS


def test_ntfs_streams_shown_and_ea_not(tmp_path: Path) -> None:
    """Many streams, a non-resident one, one on a directory; an $EA (set through
    ntfs-3g's system.ntfs_ea) is not a user attribute there, so not here either."""
    spec = TreeSpec((
        plain("many", b"m", xattrs=numbered(40, 20)),
        plain("large", b"l", xattrs=(("user.large", random_bytes(60 * KiB, 5)), ("user.small", b"s"))),
        Dir(path="dir", xattrs=(("user.note", b"on a directory"),)),
        plain("with-ea", b"e", xattrs=(("user.stream", b"a stream"),)),
    ))
    image = make_fs("ntfs", tmp_path, spec)
    ea_name, ea_value = b"NOTSHOWN", b"an NTFS EA"
    entry = struct.pack("<BBH", 0, len(ea_name), len(ea_value)) + ea_name + b"\0" + ea_value
    entry += bytes(-(len(entry) + 4) % 4)
    with mounted(image, "ntfs") as where:
        os.setxattr(where / "with-ea", "system.ntfs_ea", struct.pack("<I", len(entry) + 4) + entry)
    view = read_engine_view(image, "ntfs")
    assert_same(expected_view(spec, "ntfs"), view)
    assert_same(kernel_view(image, 0, "ntfs"), view)


@contextmanager
def ntfs_windows_streams(image: Path) -> Iterator[Path]:
    """``image`` mounted by ntfs-3g with streams as ``file:stream`` names (which
    can be any size, as Windows writes them); unmounted and detached after."""
    with loop_device(image) as device, tempfile.TemporaryDirectory(prefix="guestfs-") as where:
        run("mount", "-t", "ntfs-3g", "-o", "streams_interface=windows", device, where)
        try:
            yield Path(where)
        finally:
            if subprocess.run(["umount", where], capture_output=True, timeout=120).returncode != 0:
                subprocess.run(["umount", "--lazy", where], capture_output=True, timeout=60)


def test_ntfs_stream_over_xattr_size_max_left_out(tmp_path: Path) -> None:
    """A stream over 64 KiB cannot be an attribute on Linux: left out unread, the others shown."""
    image = make_fs("ntfs", tmp_path, TreeSpec((plain("file", b"f", xattrs=(("user.small", b"s"),)),)))
    with ntfs_windows_streams(image) as where:
        (where / "file:huge").write_bytes(random_bytes(MAX_XATTR_BYTES + 1, 6))
        (where / "file:edge").write_bytes(random_bytes(MAX_XATTR_BYTES, 7))
    assert engine_xattrs(image, "file") == {b"user.small": b"s", b"user.edge": random_bytes(MAX_XATTR_BYTES, 7)}
