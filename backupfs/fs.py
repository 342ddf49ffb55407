"""The mounted tree: pyfuse3 Operations, a thin face over the repository.

::

    MOUNT/<device>/device       rw  the live device (writes mark the bitmap)
    MOUNT/<device>/snapshot     rw  write a trigger line; read the job status
    MOUNT/<device>/chain        r   the chain, one line a backup
    MOUNT/<device>/bitmap       r   dirty-bitmap summary
    MOUNT/<device>/backups/<id> r   a backup, reconstructed through its chain
    MOUNT/<device>/backups/latest -> the newest backup

Concurrency rules: handlers run as trio tasks, and code between awaits is
atomic; everything that blocks (source and image I/O, a whole backup job)
runs in a worker thread. Reads the page cache can serve, and device writes
while they are fast, run on the loop: a thread hop costs more than they do
(engine/nowait.py, backupfs/writepolicy.py). Every handler turns unexpected
exceptions into EIO and logs them: one failing request must never take the
mount down.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import outcome
import pyfuse3
import trio

from backupfs.mountinfo import find_mount, raise_read_ahead
from backupfs.readbuffers import ReadBuffers
from backupfs.requester import Requester
from backupfs.status import JobStatus, render_bitmap, render_chain, utc_text
from backupfs.trigger import PruneCommand, TriggerCommand, TriggerError, VerifyCommand, parse_trigger
from backupfs.writepolicy import InlineWrites
from engine.advisor import Advisor
from engine.catalog import BackupRecord
from engine.chain import ChainView, WouldBlock
from engine.integrity import VerifiedView
from engine.errors import BackupfsError, ImageError
from engine.job import CancelRequest, FailingSource, Source
from engine.prune import RetentionPolicy
from engine.repo import Repository
from engine.sourceid import SourceId
from engine.text import escape, one_line

log = logging.getLogger("backupfs.fs")

BackupView = ChainView | VerifiedView  # checked reads when the backup has checksums

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
IDLE_CHAINS = 8  # chain views kept open after their last reader left
# ...and the memory they may keep: the chain index, and the checksums at
# 8 bytes per granule (128 MiB for a 1 TiB device at 64 KiB). The newest
# idle view stays whatever its size: reopening it costs seconds on a big
# device, and one view is bounded by its device.
IDLE_VIEW_BYTES = 512 * 1024 * 1024
# A sequential reader of a backup gets the layers' data read ahead: up to
# READ_WINDOW beyond it, asked for in READ_STEP pieces (measured with
# bench/fuse_vs_qemu.py: smaller steps fight the kernel's own read-ahead
# on contiguous files, a smaller window starves deep chains).
READ_BUFFER = 1024 * 1024  # the size of a direct or read-ahead request: its buffers are reused
READ_BUFFERS = 4
READ_WINDOW = 16 * 1024 * 1024
READ_STEP = 4 * 1024 * 1024
REQUESTER_POLL = 0.2  # seconds between looks at a waiting writer's signals


@dataclass(frozen=True)
class Node:
    inode: int
    kind: str
    device: str | None = None
    backup: str | None = None


class InodeTable:
    """Stable inode numbers for the names we show, for the life of the mount."""

    def __init__(self) -> None:
        root = Node(pyfuse3.ROOT_INODE, ROOT)
        self._by_key: dict[tuple[str, str | None, str | None], Node] = {(ROOT, None, None): root}
        self._by_inode: dict[int, Node] = {root.inode: root}
        self._next = pyfuse3.ROOT_INODE + 1

    def get(self, kind: str, device: str | None = None, backup: str | None = None) -> Node:
        key = (kind, device, backup)
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next, kind, device, backup)
            self._next += 1
            self._by_key[key] = node
            self._by_inode[node.inode] = node
        return node

    def node(self, inode: int) -> Node:
        node = self._by_inode.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node


@dataclass
class Handle:
    node: Node
    content: bytes = b""  # rendered text files, fixed at open
    view: BackupView | None = None
    entries: list[tuple[bytes, Node]] = field(default_factory=list)
    next_off: int = 0  # where a sequential reader of a backup reads next
    advised_to: int = 0  # how far ahead the kernel has been told to read
    requester: Requester | None = None  # who opened a trigger file for writing
    opened: float = field(default_factory=time.monotonic)


# A trigger write that reaches us this soon after a job ended, from a file
# opened before that end, was issued while the job ran: the kernel lets one
# write to a file through at a time and held it back (see _waited_behind).
QUEUED_WRITE_WINDOW = 1.0


def _one_line(line: bytes, limit: int = 200) -> str:
    """A rejected trigger line as the status shows it: escaped onto one line,
    so that no text written to the trigger reads as a line of the status
    (a forged "state: succeeded")."""
    text = one_line(line.strip().decode("utf-8", "backslashreplace"))
    return text if len(text) <= limit else text[:limit] + "..."


def _waited_behind(status: JobStatus, handle: Handle) -> bool:
    """Was this trigger write held back by the kernel behind the last job?

    Opens during a job are refused with EBUSY, but writers that opened the
    file before it started (eight hooks firing at once) reach us one after
    another as each job ends, and each would run a job of its own. Such a
    write gets EBUSY too: the job it waited for is what ran. The writer
    whose own write ran that job is not held back by it, nor one opened
    after the job started (an open during a job is refused, so that one
    opened after it ended).

    Not told apart: a write issued just after the job ended on a file
    opened before it started (the status then says what was refused), and
    writers sharing one open file (one handle: the first exemption).
    """
    began, ended = status.began, status.ended
    return (
        began is not None
        and ended is not None
        and status.writer is not handle
        and handle.opened < began
        and time.monotonic() - ended < QUEUED_WRITE_WINDOW
    )


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(fn: F) -> F:
    """Every request ends in a reply: FUSEError passes, the rest becomes an errno."""

    @functools.wraps(fn)
    async def wrapper(self: BackupOperations, *args: Any, **kwargs: Any) -> Any:
        try:
            self._inject_fault(fn.__name__, args)
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except BackupfsError as e:
            log.info("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except OSError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class BackupOperations(pyfuse3.Operations):
    """The filesystem. Built with its repository, so tests can call it unmounted."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, repo: Repository, faults: str | None = None, mountpoint: str | None = None,
                 idle_view_bytes: int = IDLE_VIEW_BYTES) -> None:
        super().__init__()
        self.repo = repo
        self.idle_view_bytes = idle_view_bytes
        self.mountpoint = mountpoint
        self.inodes = InodeTable()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._started_ns = time.time_ns()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._status: dict[str, JobStatus] = {}
        self._io = trio.CapacityLimiter(32)
        self._buffers = ReadBuffers(READ_BUFFER, READ_BUFFERS)  # inline backup reads only
        self._read_ahead_raised = False
        self._jobs = trio.CapacityLimiter(64)
        self._write_policies: dict[str, InlineWrites] = {}
        self._views: dict[str, tuple[BackupView, int]] = {}  # backup id -> (view, open count)
        self._idle_views: OrderedDict[str, BackupView] = OrderedDict()
        self._views_lock = threading.Lock()
        # Open views whose images a prune removed or rewrote: closed, not
        # kept idle, when their last use ends (their files are deleted).
        self._stale_views: set[str] = set()
        self._advisor = Advisor()  # read-ahead advice for backup readers, off the event loop
        # Test hook: "handler" or "handler:kind" entries make those requests fail.
        self._faults = {f.strip() for f in (faults or "").split(",") if f.strip()}

    # -- helpers ----------------------------------------------------------------

    def _inject_fault(self, name: str, args: tuple) -> None:
        if not self._faults or name not in {f.split(":")[0] for f in self._faults if "@" not in f}:
            return
        kind = None
        if args and isinstance(args[0], int):
            handle = self._handles.get(args[0]) if name in ("read", "write", "release", "fsync", "flush") else None
            node = handle.node if handle else self.inodes._by_inode.get(args[0])
            kind = node.kind if node else None
        if name in self._faults or f"{name}:{kind}" in self._faults:
            raise RuntimeError(f"injected fault in {name}")

    def _source_fault(self) -> Callable[[Any], Source] | None:
        """Test hook: "source-eio@N" fails every backup's Nth source read with EIO."""
        for f in self._faults:
            if f.startswith("source-eio@"):
                n = int(f.split("@", 1)[1])
                return lambda dev: FailingSource(dev.fd, dev.path, dev.size, n)
        return None

    def _device_names(self) -> list[str]:
        return [d.name for d in self.repo.devices()]

    def _backups(self, device: str) -> list[BackupRecord]:
        return self.repo.backups(device)

    def _backup(self, node: Node) -> BackupRecord:
        assert node.backup is not None
        rec = self.repo.catalog.backup(node.backup)
        if rec is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return rec

    def status(self, device: str) -> JobStatus:
        st = self._status.get(device)
        if st is None:
            st = self._status[device] = JobStatus()
        return st

    def _text(self, node: Node) -> bytes:
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

    def _children(self, node: Node) -> list[tuple[bytes, Node]]:
        if node.kind == ROOT:
            return [(n.encode(), self.inodes.get(DEVDIR, n)) for n in self._device_names()]
        if node.kind == DEVDIR:
            rec = self.repo.catalog.device(node.device or "")
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
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _parent(self, node: Node) -> Node:
        if node.kind in (ROOT, DEVDIR):
            return self.inodes.get(ROOT)
        if node.kind in (BACKUP, LATEST):
            return self.inodes.get(BACKUPS, node.device)
        return self.inodes.get(DEVDIR, node.device)

    def _exists(self, node: Node) -> bool:
        if node.kind == ROOT:
            return True
        if node.device is None or self.repo.catalog.device(node.device) is None:
            return False
        if node.kind == BACKUP:
            return self.repo.catalog.backup(node.backup or "") is not None
        if node.kind == LATEST:
            return self.repo.catalog.latest_backup(node.device) is not None
        return True

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_nlink = 1
        a.st_blksize = 4096
        a.entry_timeout = 0
        a.attr_timeout = 0
        mtime = self._started_ns
        if node.kind in (ROOT, DEVDIR, BACKUPS, DEVICE, SNAPSHOT, CHAIN, BITMAP):
            a.entry_timeout = TREE_TIMEOUT  # the name; the files' attributes change
        if node.kind in (ROOT, DEVDIR, BACKUPS):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
            a.attr_timeout = TREE_TIMEOUT
        elif node.kind == DEVICE:
            assert node.device is not None
            rec = self.repo.catalog.device(node.device)
            assert rec is not None
            a.st_mode = stat.S_IFREG | 0o600
            a.st_size = rec.size
            a.st_blocks = (rec.size + 511) // 512
            a.st_blksize = BIG_BLKSIZE
            try:  # the source's, if its path still leads to it (never another file's)
                at_path = os.stat(rec.source)
                if SourceId.of(at_path) == rec.identity:
                    mtime = at_path.st_mtime_ns
            except OSError:
                pass
        elif node.kind in (SNAPSHOT, CHAIN, BITMAP):
            a.st_mode = stat.S_IFREG | (0o600 if node.kind == SNAPSHOT else 0o444)
            a.st_size = len(self._text(node))
        elif node.kind == BACKUP:
            rec = self._backup(node)
            a.st_mode = stat.S_IFREG | 0o440
            a.st_size = rec.size
            a.st_blocks = (rec.stored_bytes + 511) // 512
            a.st_blksize = BIG_BLKSIZE
            mtime = rec.created_ns
            a.entry_timeout = BACKUP_TIMEOUT
            a.attr_timeout = BACKUP_TIMEOUT
        elif node.kind == LATEST:
            latest = self.repo.catalog.latest_backup(node.device or "")
            if latest is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_size = len(latest.id)
            mtime = latest.created_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    # -- chain views, shared between readers of a backup -----------------------

    def _acquire_view(self, rec: BackupRecord) -> BackupView:
        with self._views_lock:
            entry = self._views.get(rec.id)
            if entry is not None:
                self._views[rec.id] = (entry[0], entry[1] + 1)
                return entry[0]
            view = self._idle_views.pop(rec.id, None)
        if view is None:
            try:
                view = self.repo.open_backup(rec.id)
            except ImageError as e:
                # A chain holds a descriptor per image: views kept open for
                # a later reader must not cost this one its open.
                if not e.out_of_resources or not self._close_idle_views():
                    raise
                log.info("out of descriptors opening %s: closed the idle chain views, trying again", rec.id)
                view = self.repo.open_backup(rec.id)
        with self._views_lock:
            entry = self._views.get(rec.id)
            if entry is not None:  # another opener won the race
                view.close()
                self._views[rec.id] = (entry[0], entry[1] + 1)
                return entry[0]
            self._views[rec.id] = (view, 1)
            return view

    def _close_idle_views(self) -> int:
        """Close every view no reader holds; returns how many there were."""
        with self._views_lock:
            idle = list(self._idle_views.values())
            self._idle_views.clear()
        for v in idle:
            v.close()
        return len(idle)

    def _retain_view(self, backup_id: str) -> BackupView | None:
        """One more use of an open view (a queued advice), or None if it is not open."""
        with self._views_lock:
            entry = self._views.get(backup_id)
            if entry is None:
                return None
            self._views[backup_id] = (entry[0], entry[1] + 1)
            return entry[0]

    def _release_view(self, backup_id: str) -> None:
        to_close = []
        with self._views_lock:
            view, count = self._views[backup_id]
            if count > 1:
                self._views[backup_id] = (view, count - 1)
                return
            del self._views[backup_id]
            if backup_id in self._stale_views:
                self._stale_views.discard(backup_id)
                to_close.append(view)
            else:
                if backup_id in self._idle_views:  # two opens raced: keep one
                    to_close.append(self._idle_views.pop(backup_id))
                self._idle_views[backup_id] = view
            idle_bytes = sum(v.memory_bytes() for v in self._idle_views.values())
            while len(self._idle_views) > IDLE_CHAINS or (
                len(self._idle_views) > 1 and idle_bytes > self.idle_view_bytes
            ):
                oldest = self._idle_views.popitem(last=False)[1]
                idle_bytes -= oldest.memory_bytes()
                to_close.append(oldest)
        for v in to_close:
            v.close()

    def _raise_read_ahead(self) -> None:
        """Raise the kernel's read-ahead on our mount to READ_AHEAD_KB, once.

        Done at the first open of a backup, not at mount time: the kernel
        caps a FUSE mount's read-ahead to the max_readahead that the daemon
        answers in FUSE INIT (libfuse echoes the kernel's offer, 128 KiB),
        and INIT is answered only once serving starts, after the mount. A
        value written before that is silently cut back to 128 KiB. By the
        first open INIT is long done. Measured with bench/fuse_vs_qemu.py
        (1 GiB backup at depth 8, caches dropped, buffered dd bs=1M): 235
        MB/s and 3.7 daemon CPU s/GiB with 128 KiB requests, 511 MB/s and
        1.2 CPU s/GiB with 1 MiB requests.
        """
        if self._read_ahead_raised or self.mountpoint is None:
            return  # done, or not mounted (handlers called directly)
        self._read_ahead_raised = True
        found = find_mount(self.mountpoint)
        if found is not None:
            raise_read_ahead(found[1])

    def close_views(self) -> None:
        for device, policy in self._write_policies.items():
            log.info("device %s: %s", device, policy.summary())
        self._advisor.close()  # before the views: an advice in flight uses their files
        log.info("read-ahead advice: %d requests run, %d dropped",
                 self._advisor.done_count, self._advisor.dropped_count)
        with self._views_lock:
            views = [v for v, _ in self._views.values()] + list(self._idle_views.values())
            self._views.clear()
            self._idle_views.clear()
            self._stale_views.clear()
        for v in views:
            v.close()

    # -- lookups and attributes ---------------------------------------------------------

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._parent(parent))
        if parent.kind == BACKUPS:
            # One row, not the whole list: `ls -l` of 3,000 backups looked
            # each name up in a listing of all of them (8-12 s).
            child = self._backup_child(parent, name)
            if child is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(child)
        for child_name, child in self._children(parent):
            if child_name == name:
                return self._attrs(child)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _backup_child(self, parent: Node, name: bytes) -> Node | None:
        """The entry ``name`` of a backups directory, as _children would list it."""
        device = parent.device
        assert device is not None
        if name == b"latest":
            return self.inodes.get(LATEST, device) if self.repo.catalog.latest_backup(device) else None
        try:
            ident = name.decode()
        except UnicodeDecodeError:
            return None
        rec = self.repo.catalog.backup(ident)
        if rec is None or rec.device != device:
            return None
        return self.inodes.get(BACKUP, device, ident)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        if not self._exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(node)

    @handler
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        if node.kind == BACKUP:
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and node.kind not in (DEVICE, SNAPSHOT):
            raise pyfuse3.FUSEError(errno.EACCES)
        # A device has a fixed size, like a block device: truncation is
        # ignored (plain `dd of=device` truncates first). O_TRUNC on the
        # snapshot file (`echo full > snapshot`) is ignored too.
        return self._attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        if node.kind != LATEST:
            raise pyfuse3.FUSEError(errno.EINVAL)
        latest = self.repo.catalog.latest_backup(node.device or "")
        if latest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return latest.id.encode()

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        values = self._xattrs(node)
        value = values.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(self.inodes.node(inode)))

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node.kind != BACKUP:
            return {}
        rec = self._backup(node)
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
        return {f"user.backupfs.{k}".encode(): v.encode() for k, v in values.items()}

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.inodes.node(inode)
        raise pyfuse3.FUSEError(errno.EROFS if node.kind == BACKUP else errno.EPERM)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.inodes.node(inode)
        raise pyfuse3.FUSEError(errno.EROFS if node.kind == BACKUP else errno.EPERM)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.repo.path)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                  "f_favail", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- directories ----------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.node(inode)
        if not self._exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        # `.` and `..` first, as every local file system lists them (`ls -a`,
        # and tools that count a directory's entries, expect them).
        dots = [(b".", node), (b"..", self._parent(node))]
        return self._new_handle(Handle(node, entries=dots + self._children(node)))

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)
        for i, (name, node) in enumerate(handle.entries[start_id:], start_id):
            try:
                attrs = self._attrs(node)
            except (pyfuse3.FUSEError, BackupfsError) as e:
                # Vanished since opendir, or cannot be described now: the
                # rest of the listing still shows.
                log.info("readdir: leaving out %r: %s", name, e)
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    @handler
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files -------------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        if not self._exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if node.kind == DEVICE:
            assert node.device is not None
            await trio.to_thread.run_sync(self.repo.open_device, node.device, limiter=self._io)
            fh = self._new_handle(Handle(node))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if node.kind == SNAPSHOT:
            # The kernel serialises writes to one file, so a second trigger's
            # write would wait for the running job and then start another.
            # Its open is not serialised: refuse it here, as the spec asks.
            if writing and self.status(node.device or "").state == "running":
                raise pyfuse3.FUSEError(errno.EBUSY)
            content = b"" if writing else self._text(node)
            requester = Requester.of(ctx.pid) if writing else None
            fh = self._new_handle(Handle(node, content=content, requester=requester))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if node.kind in (CHAIN, BITMAP):
            if writing:
                raise pyfuse3.FUSEError(errno.EACCES)
            content = await trio.to_thread.run_sync(self._text, node, limiter=self._io)
            fh = self._new_handle(Handle(node, content=content))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if node.kind == BACKUP:
            if writing or flags & os.O_TRUNC:
                raise pyfuse3.FUSEError(errno.EROFS)
            rec = self._backup(node)
            view = await trio.to_thread.run_sync(self._acquire_view, rec, limiter=self._io)
            fh = self._new_handle(Handle(node, view=view))
            self._raise_read_ahead()
            # Immutable: let the page cache keep it, unless the reader asked
            # for O_DIRECT (then 1 MiB requests go straight to us).
            direct = bool(flags & os.O_DIRECT)
            return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=not direct)
        raise pyfuse3.FUSEError(errno.EISDIR)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        handle = self._handle(fh)
        node = handle.node
        if node.kind == BACKUP:
            return await self._read_backup(handle, off, size)
        if node.kind == DEVICE:
            dev = self.repo.device(node.device or "")
            try:
                # Inline when cached, as for backups (_read_backup says why).
                return dev.read(off, size, nowait=True, into=self._buffers.take(size))
            except WouldBlock:
                return await trio.to_thread.run_sync(dev.read, off, size, limiter=self._io)
        return handle.content[off : off + size]

    def _advise(self, handle: Handle, offset: int, length: int) -> None:
        """Have the advisor thread ask the kernel for [offset, offset+length) of the backup.

        The view is kept open until the advice has run: the reader may
        close its file first, and a view evicted meanwhile would have its
        descriptors reused by other files.
        """
        backup = handle.node.backup
        view = self._retain_view(backup) if backup else None
        if view is None:
            return
        self._advisor.submit(lambda: view.advise(offset, length), lambda: self._release_view(backup))

    async def _read_backup(self, handle: Handle, off: int, size: int) -> bytes | bytearray | memoryview:
        """Read a backup: inline when the page cache has it, else in a thread.

        A thread hop costs ~175 us, more than copying a cached MiB, so the
        read is tried first without waiting (RWF_NOWAIT) right here; only
        misses go to a worker. Sequential readers get read-ahead advice.
        """
        view = handle.view
        assert view is not None
        if off == handle.next_off and handle.advised_to - off < READ_WINDOW - READ_STEP:
            start = max(handle.advised_to, off)
            self._advise(handle, start, off + READ_WINDOW - start)
            handle.advised_to = off + READ_WINDOW
        try:
            data = view.read(off, size, nowait=True, into=self._buffers.take(size))
        except WouldBlock:
            data = await trio.to_thread.run_sync(view.read, off, size, limiter=self._io)
        handle.next_off = off + len(data)
        return data

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        node = handle.node
        if node.kind == DEVICE:
            dev = self.repo.device(node.device or "")
            policy = self._write_policy(dev.name)
            if policy.allowed(len(buf)):  # inline while writes are fast (writepolicy.py says why)
                try:
                    return dev.write(off, buf, nowait=True, timed=policy.inline_took)
                except WouldBlock:
                    pass
            write = functools.partial(dev.write, off, buf, timed=policy.thread_took)
            return await trio.to_thread.run_sync(write, limiter=self._io)
        if node.kind == SNAPSHOT:
            await self._trigger(node.device or "", buf, handle.requester, handle)
            return len(buf)
        raise pyfuse3.FUSEError(errno.EROFS if node.kind == BACKUP else errno.EACCES)

    def _write_policy(self, device: str) -> InlineWrites:
        policy = self._write_policies.get(device)
        if policy is None:
            policy = self._write_policies[device] = InlineWrites()
        return policy

    async def _trigger(self, device: str, line: bytes, requester: Requester | None = None,
                       handle: Handle | None = None) -> None:
        """Run what a trigger line asks for; return when it is done (and durable)."""
        status = self.status(device)
        try:
            cmd = parse_trigger(line)
        except TriggerError as e:
            if status.state != "running":
                last_job = status.began, status.ended  # not a job: writes held back behind it still are
                status.begin(_one_line(line))
                status.fail(str(e), errno.EINVAL, bitmap_kept=False)
                status.began, status.ended = last_job
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        if status.state == "running":
            raise pyfuse3.FUSEError(errno.EBUSY)
        if handle is not None and _waited_behind(status, handle):
            status.refused.append(f"{utc_text(time.time())}: '{cmd.line()}' waited for this job and was refused "
                                  "(EBUSY); write it again to run it")
            raise pyfuse3.FUSEError(errno.EBUSY)
        status.begin(cmd.line(), requester.describe() if requester else None)
        status.writer = handle
        try:
            if isinstance(cmd, VerifyCommand):
                await self._verify(device, cmd, status, requester)
            elif isinstance(cmd, PruneCommand):
                await self._prune(device, cmd, status, requester)
            else:
                await self._backup_job(device, cmd, status, requester)
        except pyfuse3.FUSEError:
            raise
        except BackupfsError as e:
            err = e.errno or errno.EIO
            if err == errno.ECANCELED:
                # The writer was killed or interrupted: it waits for EINTR.
                # Cancelled by an unmount: ECANCELED, which no one retries.
                reason = str(e).partition(": ")[2] or "on request"
                status.cancel(reason, bitmap_kept=isinstance(cmd, TriggerCommand))
                log.info("%s of %s cancelled: %s", cmd.line(), device, status.error)
                raise pyfuse3.FUSEError(errno.EINTR if getattr(e, "interrupted", False)
                                        else errno.ECANCELED) from None
            status.fail(str(e), err, bitmap_kept=isinstance(cmd, TriggerCommand) and err != errno.EINVAL)
            log.info("%s of %s failed: %s", cmd.line(), device, e)
            raise pyfuse3.FUSEError(err) from None
        except Exception as e:
            log.exception("%s of %s failed", cmd.line(), device)
            status.fail(f"internal error: {type(e).__name__}: {e} (see the log)", errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _run_job(self, fn: Callable[[CancelRequest], Any], status: JobStatus,
                       requester: Requester | None) -> Any:
        """Run ``fn(cancel)`` in a worker; cancel it if the requester is told to stop.

        The watch is what makes Ctrl-C, ``kill`` and ``timeout`` work on a
        writer that waits for its backup (backupfs/requester.py says why
        the kernel cannot do it for us).
        """
        cancel = CancelRequest()

        async def watch(requester: Requester) -> None:
            while not cancel.is_set():
                await trio.sleep(REQUESTER_POLL)
                sig = requester.stopping_signal()
                if sig is not None:
                    cancel.cancel(f"{requester.describe()} received {signal.Signals(sig).name}",
                                  interrupted=True)

        async with trio.open_nursery() as nursery:
            if requester is not None:
                nursery.start_soon(watch, requester)
            result = await trio.to_thread.run_sync(outcome.capture, fn, cancel, limiter=self._jobs)
            nursery.cancel_scope.cancel()
        return result.unwrap()

    async def _backup_job(self, device: str, cmd: TriggerCommand, status: JobStatus,
                          requester: Requester | None = None) -> None:
        def progress(p: Any) -> None:
            status.progress = p

        def run(cancel: CancelRequest) -> Any:
            return self.repo.backup(
                device, cmd.kind, cluster_size=cmd.cluster_size, scan=cmd.scan, label=cmd.label,
                auto_full=cmd.auto_full, on_progress=progress, rate=cmd.rate, cancel=cancel,
                source_factory=self._source_fault(),
            )

        result = await self._run_job(run, status, requester)
        status.succeed(result)
        log.info("%s", result.summary())

    async def _verify(self, device: str, cmd: VerifyCommand, status: JobStatus,
                      requester: Requester | None = None) -> None:
        def run(cancel: CancelRequest) -> Any:
            return self.repo.verify(device, cmd.backup, cancel=cancel)

        report = await self._run_job(run, status, requester)
        lines = [f"report: {line}" for line in report.render().splitlines()]
        if not report.ok:
            status.fail(f"verification found {len(report.problems)} problems", errno.EIO,
                        bitmap_kept=False, lines=lines)
            raise pyfuse3.FUSEError(errno.EIO)
        status.succeed(lines=lines)

    async def _prune(self, device: str, cmd: PruneCommand, status: JobStatus,
                     requester: Requester | None = None) -> None:
        policy = RetentionPolicy(cmd.keep_last, cmd.keep_daily, cmd.keep_weekly, cmd.keep_monthly)

        def run(cancel: CancelRequest) -> Any:
            return self.repo.prune(device, None if policy.empty() else policy, cmd.remove,
                                   dry_run=cmd.dry_run, cancel=cancel)

        before = {b.id for b in self._backups(device)}
        try:
            plans = await self._run_job(run, status, requester)
        finally:
            if not cmd.dry_run:  # also when cancelled part way: some may be gone
                await self._forget_removed(device, before)
        verb = "would remove" if cmd.dry_run else "removed"
        status.succeed(lines=[f"{verb}: {p.describe()}" for p in plans] or ["removed: nothing"])

    async def _forget_removed(self, device: str, before: set[str]) -> None:
        """The kernel caches backup entries for long: tell it which are gone,
        and let new opens of rewritten backups see their new images.

        Done before the trigger returns, so the script that pruned sees it.
        (The kernel takes the backups directory's lock, not the snapshot
        file's, so this cannot wait on the request we are serving.)
        """
        after = {b.id for b in self._backups(device)}
        backups_dir = self.inodes.get(BACKUPS, device).inode
        for gone in sorted(before - after):
            await trio.to_thread.run_sync(self._invalidate, backups_dir, gone.encode())
        for kept in sorted(after):  # children of a removed one were rewritten: new st_blocks
            inode = self.inodes.get(BACKUP, device, kept).inode
            await trio.to_thread.run_sync(self._invalidate_attrs, inode)
        self._drop_idle_views()

    @staticmethod
    def _invalidate(parent: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel had not cached it
                log.warning("cannot invalidate %r: %s", name, e)

    @staticmethod
    def _invalidate_attrs(inode: int) -> None:
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel had not cached it
                log.warning("cannot invalidate inode %d: %s", inode, e)

    def _drop_idle_views(self) -> None:
        """After a prune: close idle views, and views in use once their use ends
        (a reader, or advice still queued), so deleted images are let go."""
        with self._views_lock:
            self._stale_views.update(self._views)
        self._close_idle_views()

    @handler
    async def flush(self, fh: int) -> None:
        self._handle(fh)  # writes go straight to the source: nothing buffered here

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        if handle.node.kind == DEVICE:
            dev = self.repo.device(handle.node.device or "")
            await trio.to_thread.run_sync(dev.fsync, limiter=self._io)

    @handler
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.view is not None and handle.node.backup:
            self._release_view(handle.node.backup)

    # -- what the tree does not allow ----------------------------------------------------

    def _refuse(self, parent_inode: int) -> pyfuse3.FUSEError:
        parent = self.inodes.node(parent_inode)
        return pyfuse3.FUSEError(errno.EROFS if parent.kind == BACKUPS else errno.EPERM)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._refuse(parent_inode)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._refuse(parent_inode)

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise self._refuse(parent_inode_old)

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise self._refuse(parent_inode)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._refuse(parent_inode)

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._refuse(parent_inode)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._refuse(parent_inode)

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._refuse(new_parent_inode)

    @handler
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        pass  # inode numbers live as long as the mount
