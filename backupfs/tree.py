"""The mounted tree as a model: nodes, names, attributes and texts, no FUSE.

::

    MOUNT/<device>/device       rw  the live device (writes mark the bitmap)
    MOUNT/<device>/snapshot     rw  write a trigger line; read the job status (as JSON: its
                                    xattr user.backupfs.status, backupfs/mountstatus.py)
    MOUNT/<device>/chain        r   the chain, one line a backup
    MOUNT/<device>/bitmap       r   dirty-bitmap summary (as JSON: its xattr user.backupfs.bitmap)
    MOUNT/<device>/backups/<id> r   a backup, reconstructed through its chain
    MOUNT/<device>/backups/latest -> the newest backup

The pyfuse3 handlers (backupfs/fs.py) translate requests into calls on
``Tree`` and its answers back; what the tree shows can so be tested with a
repository and no mount (tests/test_tree_model.py). A new part of the tree
(a device's files, changes or versions) is a new kind: an entry in its
parent's listing, its own registrations in ``Tree`` (listing, lookup,
existence check, attributes) and PARENT_KIND, and what opening it serves
in fs.py.

Nothing here blocks for long, except ``text`` of a chain or bitmap, which
fs.py renders in a worker thread when a file is opened.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from backupfs.mountstatus import BITMAP_XATTR, STATUS_XATTR, encode_status
from backupfs.status import JobStatus, bitmap_fields, render_bitmap, render_chain, utc_text
from engine.catalog import BackupRecord
from engine.errors import BackupfsError
from engine.repo import Repository
from engine.sourceid import SourceId
from engine.text import escape, one_line

ROOT_INODE = 1  # the kernel's number for the root (pyfuse3.ROOT_INODE; fs.py checks)

ROOT, DEVDIR, DEVICE, SNAPSHOT, CHAIN, BITMAP, BACKUPS, BACKUP, LATEST = (
    "root", "devdir", "device", "snapshot", "chain", "bitmap", "backups", "backup", "latest",
)
DEVDIR_ENTRIES = (("device", DEVICE), ("snapshot", SNAPSHOT), ("chain", CHAIN), ("bitmap", BITMAP),
                  ("backups", BACKUPS))
XATTRS = ("kind", "parent", "cluster_size", "granularity", "stored_bytes", "created", "image")
BACKUP_TIMEOUT = 3600.0  # backups never change while they exist
# The directories, and the names in a device's directory, are fixed for
# the life of a mount (a device added or removed through MOUNT/.control
# has its root entry invalidated, backupfs/fs.py): the kernel may keep them. Without it every
# path walk asked again for MOUNT/vm1 and MOUNT/vm1/backups, and `ls -l` of
# 1,000 backups took 1.6 s.
TREE_TIMEOUT = 3600.0
BIG_BLKSIZE = 1024 * 1024  # tell tools to read in large blocks


class RequestError(Exception):
    """A request the mount answers with an errno: a name the tree does not
    have, a trigger refused. fs.py passes the errno on to the kernel without
    logging it, as it is no fault of ours."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class Node:
    inode: int
    kind: str
    device: str | None = None
    backup: str | None = None
    volume: str | None = None  # inside a backup's files (backupfs/filestree.py)
    path: tuple[bytes, ...] = ()  # names from the volume's root (the first path seen, for a hard link)


class InodeTable:
    """Stable inode numbers for the names we show, for the life of the mount.

    Used from the event loop (lookup counts, forgets) and from worker
    threads (a guest's nodes are made where its listings are read): every
    change is made under ``_lock``, or two workers could hand out one
    number for two files.
    """

    def __init__(self) -> None:
        root = Node(ROOT_INODE, ROOT)
        self._lock = threading.Lock()
        self._by_key: dict[tuple[object, ...], Node] = {(ROOT, None, None): root}
        self._by_inode: dict[int, Node] = {root.inode: root}
        self._next = ROOT_INODE + 1
        # Nodes the kernel may forget (a guest's files: there may be
        # millions), with the kernel's count of lookups of each.
        self._lookups: dict[int, int] = {}
        self._key_of: dict[int, tuple[object, ...]] = {}

    def get(self, kind: str, device: str | None = None, backup: str | None = None) -> Node:
        key = (kind, device, backup)
        with self._lock:
            node = self._by_key.get(key)
            if node is None:
                node = Node(self._next, kind, device, backup)
                self._next += 1
                self._by_key[key] = node
                self._by_inode[node.inode] = node
            return node

    def get_forgettable(self, key: tuple[object, ...], make: Callable[[int], Node]) -> Node:
        """The node for ``key``, made by ``make(inode)`` if new; dropped again
        when the kernel has forgotten every lookup of it (``forget``)."""
        with self._lock:
            node = self._by_key.get(key)
            if node is None:
                node = make(self._next)
                self._next += 1
                self._by_key[key] = node
                self._by_inode[node.inode] = node
                self._lookups[node.inode] = 0
                self._key_of[node.inode] = key
            return node

    def looked_up(self, node: Node) -> None:
        """The kernel now holds one more reference (a lookup, a readdirplus entry).

        A forgettable node may have been dropped since it was found: by a
        forget that raced with the worker that found it, or by another
        listing's ``drop_unheld`` (two listings of one directory share its
        nodes). The kernel holds it now, so it is known again by its
        number, with this one lookup. Not by its key: a later lookup of
        the name makes a new node, which the kernel takes in its place.
        """
        with self._lock:
            held = self._lookups.get(node.inode)
            if held is not None:
                self._lookups[node.inode] = held + 1
            elif node.inode not in self._by_inode:
                self._by_inode[node.inode] = node
                self._lookups[node.inode] = 1

    def forget(self, inode: int, count: int) -> None:
        """The kernel let go of ``count`` lookups; the last one drops a forgettable node."""
        with self._lock:
            self._forget(inode, count)

    def _forget(self, inode: int, count: int) -> None:
        held = self._lookups.get(inode)
        if held is None:
            return  # the fixed tree: kept for the life of the mount
        if held > count:
            self._lookups[inode] = held - count
            return
        del self._lookups[inode]
        node = self._by_inode.pop(inode, None)
        key = self._key_of.pop(inode, None)
        if key is not None and self._by_key.get(key) is node:
            del self._by_key[key]

    def drop_unheld(self, nodes: list[Node]) -> None:
        """Drop forgettable nodes the kernel never got (a listing read only in part)."""
        with self._lock:
            for node in nodes:
                if self._lookups.get(node.inode) == 0:
                    self._forget(node.inode, 0)

    def held(self) -> int:
        """How many forgettable nodes are kept (for tests and the log)."""
        return len(self._lookups)

    def find(self, inode: int) -> Node | None:
        """The node of a number handed out, or None."""
        return self._by_inode.get(inode)

    def node(self, inode: int) -> Node:
        node = self._by_inode.get(inode)
        if node is None:
            raise RequestError(errno.ENOENT)
        return node


@dataclass
class Attributes:
    """What stat shows of a node, and how long the kernel may keep it;
    owner and group are the mount's, filled in by fs.py."""

    inode: int
    mode: int = 0
    size: int = 0
    blocks: int = 0
    blksize: int = 4096
    nlink: int = 1
    mtime_ns: int = 0
    entry_timeout: float = 0
    attr_timeout: float = 0
    # A guest's own (files inside a backup); None: the mount's owner, and mtime for both times.
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    ctime_ns: int | None = None
    rdev: int = 0


# Where each kind sits: the kind of its parent directory.
PARENT_KIND = {ROOT: ROOT, DEVDIR: ROOT, DEVICE: DEVDIR, SNAPSHOT: DEVDIR, CHAIN: DEVDIR, BITMAP: DEVDIR,
               BACKUPS: DEVDIR, BACKUP: BACKUPS, LATEST: BACKUPS}

Listing = list[tuple[bytes, Node]]


class Tree:
    """The names, attributes and texts of the mounted tree, read from the repository.

    ``status`` gives a device's job status (the snapshot file's text),
    owned by the job runner; ``started_ns`` is the mount's start, the
    mtime of what has no time of its own.

    Each kind's behaviour is registered by kind: its listing if it is a
    directory (``_listings``), a one-row lookup where listing to find one
    name costs too much (``_lookups``), whether it still exists beyond its
    device (``_checks``), and its attributes (``_describers``). A new kind
    registers there and in PARENT_KIND.
    """

    def __init__(self, repo: Repository, status: Callable[[str], JobStatus], started_ns: int) -> None:
        self.repo = repo
        self.status = status
        self.inodes = InodeTable()
        self._started_ns = started_ns
        # Why the last read (or open) of a backup through the mount failed:
        # the reader got only EIO; `backupfs restore` and the file-restore
        # helper read it back as user.backupfs.read_error to say why.
        self.read_errors: dict[str, str] = {}
        self._listings: dict[str, Callable[[Node], Listing]] = {
            ROOT: self._root_entries, DEVDIR: self._devdir_entries, BACKUPS: self._backups_entries,
        }
        self._lookups: dict[str, Callable[[Node, bytes], Node | None]] = {BACKUPS: self._backup_child}
        self._checks: dict[str, Callable[[Node], bool]] = {
            BACKUP: lambda node: self.repo.backup_record(node.backup or "") is not None,
            LATEST: lambda node: self.repo.latest_backup(node.device or "") is not None,
        }
        self._describers: dict[str, Callable[[Node, Attributes], None]] = {
            ROOT: self._describe_dir, DEVDIR: self._describe_dir, BACKUPS: self._describe_dir,
            DEVICE: self._describe_device, SNAPSHOT: self._describe_text, CHAIN: self._describe_text,
            BITMAP: self._describe_text, BACKUP: self._describe_backup, LATEST: self.describe_latest,
        }
        # Kinds a later part of the tree adds (backupfs/filestree.py): where
        # their parent is when it is not fixed by kind, their text, link
        # target and extended attributes.
        self._parents: dict[str, Callable[[Node], Node]] = {}
        self._texts: dict[str, Callable[[Node], bytes]] = {}
        self._links: dict[str, Callable[[Node], bytes]] = {LATEST: self.latest_target}
        self._xattr_sources: dict[str, Callable[[Node], dict[bytes, bytes]]] = {
            SNAPSHOT: self._snapshot_xattrs, BACKUP: self._backup_xattrs, BITMAP: self._bitmap_xattrs,
        }
        # Kinds whose answers read a backup's guest (seconds on a cold
        # cache): fs.py asks for them in a worker thread.
        self.blocking_kinds: set[str] = set()
        self.quick_attribute_kinds: set[str] = set()
        self._parent_kind = dict(PARENT_KIND)
        self.devdir_entries = list(DEVDIR_ENTRIES)  # a later part adds its directory here

    def register(self, kind: str, parent_kind: str | None = None, *,
                 listing: Callable[[Node], Listing] | None = None,
                 lookup: Callable[[Node, bytes], Node | None] | None = None,
                 check: Callable[[Node], bool] | None = None,
                 describe: Callable[[Node, Attributes], None] | None = None,
                 parent: Callable[[Node], Node] | None = None,
                 text: Callable[[Node], bytes] | None = None,
                 link: Callable[[Node], bytes] | None = None,
                 xattrs: Callable[[Node], dict[bytes, bytes]] | None = None,
                 blocking: bool = False, quick_attributes: bool = False) -> None:
        """Add a kind of node to the tree (what each registry above holds)."""
        for table, value in ((self._listings, listing), (self._lookups, lookup), (self._checks, check),
                             (self._describers, describe), (self._parents, parent), (self._texts, text),
                             (self._links, link), (self._xattr_sources, xattrs)):
            if value is not None:
                table[kind] = value  # type: ignore[index]
        if parent_kind is not None:
            self._parent_kind[kind] = parent_kind
        if blocking:
            self.blocking_kinds.add(kind)
        if quick_attributes:  # its listing reads a guest, its attributes and xattrs do not
            self.quick_attribute_kinds.add(kind)

    def root(self) -> Node:
        return self.inodes.get(ROOT)

    def _device_names(self) -> list[str]:
        return [d.name for d in self.repo.devices()]

    def _backups(self, device: str) -> list[BackupRecord]:
        return self.repo.backups(device)

    def backup(self, node: Node) -> BackupRecord:
        """The catalog row of a backup node; ENOENT once it is pruned."""
        assert node.backup is not None
        rec = self.repo.backup_record(node.backup)
        if rec is None:
            raise RequestError(errno.ENOENT)
        return rec

    def text(self, node: Node) -> bytes:
        """The content of a text file (snapshot, chain, bitmap, ...) as of now."""
        assert node.device is not None
        render = self._texts.get(node.kind)
        if render is not None:
            return render(node)
        if node.kind == SNAPSHOT:
            return self.status(node.device).render().encode()
        if node.kind == CHAIN:
            return render_chain(self._backups(node.device)).encode()
        try:
            dev = self.repo.device(node.device)
        except BackupfsError as e:  # its source is missing, say: the file tells why
            return f"bitmap unavailable: {e}\n".encode()
        return render_bitmap(dev).encode()

    # -- names --------------------------------------------------------------------------

    def children(self, node: Node) -> Listing:
        """A directory's entries, without `.` and `..`; ENOTDIR for a file."""
        listing = self._listings.get(node.kind)
        if listing is None:
            raise RequestError(errno.ENOTDIR)
        return listing(node)

    def _root_entries(self, node: Node) -> Listing:
        return [(n.encode(), self.inodes.get(DEVDIR, n)) for n in self._device_names()]

    def _devdir_entries(self, node: Node) -> Listing:
        rec = self.repo.device_record(node.device or "")
        live = rec is not None and bool(rec.source)
        return [
            (n.encode(), self.inodes.get(k, node.device))
            for n, k in self.devdir_entries
            if live or k not in (DEVICE, BITMAP)  # an imported archive has no live disk
        ]

    def _backups_entries(self, node: Node) -> Listing:
        assert node.device is not None
        backups = self._backups(node.device)
        out = [(b.id.encode(), self.inodes.get(BACKUP, node.device, b.id)) for b in backups]
        if backups:
            out.append((b"latest", self.inodes.get(LATEST, node.device)))
        return out

    def child(self, parent: Node, name: bytes) -> Node:
        """The entry ``name`` of a directory, `.` and `..` included; ENOENT if none."""
        if name == b".":
            return parent
        if name == b"..":
            return self.parent(parent)
        lookup = self._lookups.get(parent.kind)
        if lookup is not None:
            child = lookup(parent, name)
            if child is None:
                raise RequestError(errno.ENOENT)
            return child
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise RequestError(errno.ENOENT)

    def _backup_child(self, parent: Node, name: bytes) -> Node | None:
        return self.backup_child(parent, name, BACKUP, LATEST)

    def backup_child(self, parent: Node, name: bytes, kind: str, latest_kind: str | None) -> Node | None:
        """The entry ``name`` of a directory with one ``kind`` node per backup of its
        device (backups/, files/, changes/), and ``latest`` if ``latest_kind``.

        One row, not the whole list: `ls -l` of 3,000 backups looked each
        name up in a listing of all of them (8-12 s)."""
        device = parent.device
        assert device is not None
        if name == b"latest" and latest_kind is not None:
            return self.inodes.get(latest_kind, device) if self.repo.latest_backup(device) else None
        try:
            ident = name.decode()
        except UnicodeDecodeError:
            return None
        rec = self.repo.backup_record(ident)
        if rec is None or rec.device != device:
            return None
        return self.inodes.get(kind, device, ident)

    def parent(self, node: Node) -> Node:
        find = self._parents.get(node.kind)
        if find is not None:
            return find(node)
        kind = self._parent_kind[node.kind]
        return self.inodes.get(kind, None if kind == ROOT else node.device)

    def exists(self, node: Node) -> bool:
        """Is the node still there? (A pruned backup's inode outlives it.)"""
        if node.kind == ROOT:
            return True
        check = self._checks.get(node.kind)
        if node.device is None:  # a file of the root's own (MOUNT/.control), if its kind says so
            return check is not None and check(node)
        if self.repo.device_record(node.device) is None:
            return False
        return check is None or check(node)

    # -- attributes -------------------------------------------------------------------

    def attributes(self, node: Node) -> Attributes:
        a = Attributes(node.inode, mtime_ns=self._started_ns)
        self._describers[node.kind](node, a)
        return a

    def _describe_dir(self, node: Node, a: Attributes) -> None:
        # The directories, and the names in a device's directory, are fixed
        # for the life of a mount: the kernel may keep names and attributes.
        a.entry_timeout = TREE_TIMEOUT
        a.mode = stat.S_IFDIR | 0o755
        a.nlink = 2
        a.size = 0
        a.attr_timeout = TREE_TIMEOUT

    def _describe_device(self, node: Node, a: Attributes) -> None:
        assert node.device is not None
        a.entry_timeout = TREE_TIMEOUT  # the name; the file's attributes change
        rec = self.repo.device_record(node.device)
        assert rec is not None
        a.mode = stat.S_IFREG | 0o600
        a.size = rec.size
        a.blocks = (rec.size + 511) // 512
        a.blksize = BIG_BLKSIZE
        try:  # the source's, if its path still leads to it (never another file's)
            at_path = os.stat(rec.source)
            if SourceId.of(at_path) == rec.identity:
                a.mtime_ns = at_path.st_mtime_ns
        except OSError:
            pass

    def _describe_text(self, node: Node, a: Attributes) -> None:
        a.entry_timeout = TREE_TIMEOUT  # the name; the file's attributes change
        a.mode = stat.S_IFREG | (0o600 if node.kind == SNAPSHOT else 0o444)
        a.size = len(self.text(node))

    def _describe_backup(self, node: Node, a: Attributes) -> None:
        rec = self.backup(node)
        a.mode = stat.S_IFREG | 0o440
        a.size = rec.size
        a.blocks = (rec.stored_bytes + 511) // 512
        a.blksize = BIG_BLKSIZE
        a.mtime_ns = rec.created_ns
        a.entry_timeout = BACKUP_TIMEOUT
        a.attr_timeout = BACKUP_TIMEOUT

    def describe_latest(self, node: Node, a: Attributes) -> None:
        latest = self.repo.latest_backup(node.device or "")
        if latest is None:
            raise RequestError(errno.ENOENT)
        a.mode = stat.S_IFLNK | 0o777
        a.size = len(latest.id)
        a.mtime_ns = latest.created_ns

    # -- symlinks and extended attributes ---------------------------------------------

    def link_target(self, node: Node) -> bytes:
        """Where a symlink points; EINVAL for anything else."""
        target = self._links.get(node.kind)
        if target is None:
            raise RequestError(errno.EINVAL)
        return target(node)

    def latest_target(self, node: Node) -> bytes:
        latest = self.repo.latest_backup(node.device or "")
        if latest is None:
            raise RequestError(errno.ENOENT)
        return latest.id.encode()

    def xattrs(self, node: Node) -> dict[bytes, bytes]:
        """The extended attributes: a backup's catalog row; the snapshot
        file's job status as JSON (backupfs/mountstatus.py); a guest file's
        ``user.*``; nothing elsewhere."""
        source = self._xattr_sources.get(node.kind)
        return {} if source is None else source(node)

    def _snapshot_xattrs(self, node: Node) -> dict[bytes, bytes]:
        assert node.device is not None
        return {STATUS_XATTR.encode(): encode_status(self.status(node.device).fields())}

    def _bitmap_xattrs(self, node: Node) -> dict[bytes, bytes]:
        """The bitmap state as JSON (status --json through the mount), or why there is none."""
        assert node.device is not None
        try:
            value: object = bitmap_fields(self.repo.device(node.device))
        except BackupfsError as e:  # its source is missing, say: as the text tells it
            value = {"error": f"bitmap unavailable: {e}"}
        return {BITMAP_XATTR.encode(): json.dumps(value, ensure_ascii=True).encode()}

    def _backup_xattrs(self, node: Node) -> dict[bytes, bytes]:
        rec = self.backup(node)
        values = {
            "kind": rec.kind,
            "parent": rec.parent or "",
            "cluster_size": str(rec.cluster_size),
            "granularity": str(rec.granularity),
            "stored_bytes": str(rec.stored_bytes),
            "created": utc_text(rec.created_ns),
            "image": rec.image,
        }
        if rec.label:
            values["label"] = escape(rec.label)  # as `list` and the chain file show it
        if rec.id in self.read_errors:
            values["read_error"] = one_line(self.read_errors[rec.id])
        return {f"user.backupfs.{k}".encode(): v.encode() for k, v in values.items()}
