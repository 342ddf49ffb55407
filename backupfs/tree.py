"""The mounted tree as a model: nodes, names, attributes and texts, no FUSE.

::

    MOUNT/<device>/device       rw  the live device (writes mark the bitmap)
    MOUNT/<device>/snapshot     rw  write a trigger line; read the job status
    MOUNT/<device>/chain        r   the chain, one line a backup
    MOUNT/<device>/bitmap       r   dirty-bitmap summary
    MOUNT/<device>/backups/<id> r   a backup, reconstructed through its chain
    MOUNT/<device>/backups/latest -> the newest backup

The pyfuse3 handlers (backupfs/fs.py) translate requests into calls on
``Tree`` and its answers back; what the tree shows can so be tested with a
repository and no mount (tests/test_tree_model.py). A new part of the tree
(a device's files, changes or versions) is a new kind: its name in a
parent's ``children`` and ``child``, its ``parent``, ``exists`` and
``attributes``, and what opening it serves in fs.py.

Nothing here blocks for long, except ``text`` of a chain or bitmap, which
fs.py renders in a worker thread when a file is opened.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from backupfs.status import JobStatus, render_bitmap, render_chain, utc_text
from engine.catalog import BackupRecord
from engine.errors import BackupfsError
from engine.repo import Repository

ROOT_INODE = 1  # the kernel's number for the root (pyfuse3.ROOT_INODE; fs.py checks)

ROOT, DEVDIR, DEVICE, SNAPSHOT, CHAIN, BITMAP, BACKUPS, BACKUP, LATEST = (
    "root", "devdir", "device", "snapshot", "chain", "bitmap", "backups", "backup", "latest",
)
DEVDIR_ENTRIES = (("device", DEVICE), ("snapshot", SNAPSHOT), ("chain", CHAIN), ("bitmap", BITMAP),
                  ("backups", BACKUPS))
XATTRS = ("kind", "parent", "cluster_size", "granularity", "stored_bytes", "created", "image")
BACKUP_TIMEOUT = 3600.0  # backups never change while they exist
# The directories, and the names in a device's directory, are fixed for
# the life of a mount (adding or removing a device needs the repository's
# lock, which the mount holds): the kernel may keep them. Without it every
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


class InodeTable:
    """Stable inode numbers for the names we show, for the life of the mount."""

    def __init__(self) -> None:
        root = Node(ROOT_INODE, ROOT)
        self._by_key: dict[tuple[str, str | None, str | None], Node] = {(ROOT, None, None): root}
        self._by_inode: dict[int, Node] = {root.inode: root}
        self._next = ROOT_INODE + 1

    def get(self, kind: str, device: str | None = None, backup: str | None = None) -> Node:
        key = (kind, device, backup)
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next, kind, device, backup)
            self._next += 1
            self._by_key[key] = node
            self._by_inode[node.inode] = node
        return node

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


class Tree:
    """The names, attributes and texts of the mounted tree, read from the repository.

    ``status`` gives a device's job status (the snapshot file's text),
    owned by the job runner; ``started_ns`` is the mount's start, the
    mtime of what has no time of its own.
    """

    def __init__(self, repo: Repository, status: Callable[[str], JobStatus], started_ns: int) -> None:
        self.repo = repo
        self.status = status
        self.inodes = InodeTable()
        self._started_ns = started_ns

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
        """The content of a text file (snapshot, chain, bitmap) as of now."""
        assert node.device is not None
        if node.kind == SNAPSHOT:
            return self.status(node.device).render().encode()
        if node.kind == CHAIN:
            return render_chain(self._backups(node.device)).encode()
        try:
            dev = self.repo.device(node.device)
        except BackupfsError as e:  # its source is missing, say: the file tells why
            return f"bitmap unavailable: {e}\n".encode()
        return render_bitmap(dev).encode()

    def children(self, node: Node) -> list[tuple[bytes, Node]]:
        """A directory's entries, without `.` and `..`; ENOTDIR for a file."""
        if node.kind == ROOT:
            return [(n.encode(), self.inodes.get(DEVDIR, n)) for n in self._device_names()]
        if node.kind == DEVDIR:
            rec = self.repo.device_record(node.device or "")
            live = rec is not None and bool(rec.source)
            return [
                (n.encode(), self.inodes.get(k, node.device))
                for n, k in DEVDIR_ENTRIES
                if live or k not in (DEVICE, BITMAP)  # an imported archive has no live disk
            ]
        if node.kind == BACKUPS:
            assert node.device is not None
            backups = self._backups(node.device)
            out = [(b.id.encode(), self.inodes.get(BACKUP, node.device, b.id)) for b in backups]
            if backups:
                out.append((b"latest", self.inodes.get(LATEST, node.device)))
            return out
        raise RequestError(errno.ENOTDIR)

    def child(self, parent: Node, name: bytes) -> Node:
        """The entry ``name`` of a directory, `.` and `..` included; ENOENT if none."""
        if name == b".":
            return parent
        if name == b"..":
            return self.parent(parent)
        if parent.kind == BACKUPS:
            # One row, not the whole list: `ls -l` of 3,000 backups looked
            # each name up in a listing of all of them (8-12 s).
            child = self._backup_child(parent, name)
            if child is None:
                raise RequestError(errno.ENOENT)
            return child
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise RequestError(errno.ENOENT)

    def _backup_child(self, parent: Node, name: bytes) -> Node | None:
        """The entry ``name`` of a backups directory, as children would list it."""
        device = parent.device
        assert device is not None
        if name == b"latest":
            return self.inodes.get(LATEST, device) if self.repo.latest_backup(device) else None
        try:
            ident = name.decode()
        except UnicodeDecodeError:
            return None
        rec = self.repo.backup_record(ident)
        if rec is None or rec.device != device:
            return None
        return self.inodes.get(BACKUP, device, ident)

    def parent(self, node: Node) -> Node:
        if node.kind in (ROOT, DEVDIR):
            return self.inodes.get(ROOT)
        if node.kind in (BACKUP, LATEST):
            return self.inodes.get(BACKUPS, node.device)
        return self.inodes.get(DEVDIR, node.device)

    def exists(self, node: Node) -> bool:
        """Is the node still there? (A pruned backup's inode outlives it.)"""
        if node.kind == ROOT:
            return True
        if node.device is None or self.repo.device_record(node.device) is None:
            return False
        if node.kind == BACKUP:
            return self.repo.backup_record(node.backup or "") is not None
        if node.kind == LATEST:
            return self.repo.latest_backup(node.device) is not None
        return True

    def attributes(self, node: Node) -> Attributes:
        a = Attributes(node.inode)
        mtime = self._started_ns
        if node.kind in (ROOT, DEVDIR, BACKUPS, DEVICE, SNAPSHOT, CHAIN, BITMAP):
            a.entry_timeout = TREE_TIMEOUT  # the name; the files' attributes change
        if node.kind in (ROOT, DEVDIR, BACKUPS):
            a.mode = stat.S_IFDIR | 0o755
            a.nlink = 2
            a.size = 0
            a.attr_timeout = TREE_TIMEOUT
        elif node.kind == DEVICE:
            assert node.device is not None
            rec = self.repo.device_record(node.device)
            assert rec is not None
            a.mode = stat.S_IFREG | 0o600
            a.size = rec.size
            a.blocks = (rec.size + 511) // 512
            a.blksize = BIG_BLKSIZE
            try:
                mtime = os.stat(rec.source).st_mtime_ns
            except OSError:
                pass
        elif node.kind in (SNAPSHOT, CHAIN, BITMAP):
            a.mode = stat.S_IFREG | (0o600 if node.kind == SNAPSHOT else 0o444)
            a.size = len(self.text(node))
        elif node.kind == BACKUP:
            rec = self.backup(node)
            a.mode = stat.S_IFREG | 0o440
            a.size = rec.size
            a.blocks = (rec.stored_bytes + 511) // 512
            a.blksize = BIG_BLKSIZE
            mtime = rec.created_ns
            a.entry_timeout = BACKUP_TIMEOUT
            a.attr_timeout = BACKUP_TIMEOUT
        elif node.kind == LATEST:
            latest = self.repo.latest_backup(node.device or "")
            if latest is None:
                raise RequestError(errno.ENOENT)
            a.mode = stat.S_IFLNK | 0o777
            a.size = len(latest.id)
            mtime = latest.created_ns
        a.mtime_ns = mtime
        return a

    def link_target(self, node: Node) -> bytes:
        """Where a symlink points; EINVAL for anything else."""
        if node.kind != LATEST:
            raise RequestError(errno.EINVAL)
        latest = self.repo.latest_backup(node.device or "")
        if latest is None:
            raise RequestError(errno.ENOENT)
        return latest.id.encode()

    def xattrs(self, node: Node) -> dict[bytes, bytes]:
        """The extended attributes: a backup's catalog row, nothing elsewhere."""
        if node.kind != BACKUP:
            return {}
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
            values["label"] = rec.label
        return {f"user.backupfs.{k}".encode(): v.encode() for k, v in values.items()}
