"""The read-only filesystem of a remote mount (`backupfs mount s3://BUCKET/PREFIX MOUNT`).

The same tree model as a local mount (backupfs/tree.py) over a
``RemoteRepository`` (engine/remote/remoterepo.py): ``<device>/backups/<id>``,
``latest`` and ``chain``, with the same sizes, times and extended
attributes, and the same files view (``files/``, backupfs/filestree.py)
and history (``changes/``, ``versions/``, backupfs/historytree.py), built
from the same pieces over the remote's backups. A remote has no live disk,
no jobs and no control file, so a device's directory shows no ``device``,
``snapshot`` or ``bitmap``; the kernel mount is ``ro`` (every write is EROFS
before it reaches us).

Kept apart from backupfs/fs.py, whose operations are built around a local
repository's jobs, devices and control file; what both answer alike
(lookups, listings, attributes, who may see a guest's files, guest files
opened and read) is backupfs/readops.py. A backup, and a guest file, is
always read in a worker thread (a read may wait for the network); the
chain under it fetches what it is about to read through the object cache,
and a remote that stops answering fails that read with EIO once the
store's timeouts run out.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any

import pyfuse3
import trio

from backupfs.filescache import FilesCache
from backupfs.filestree import FILES_LATEST, VOLUMES, FilesView
from backupfs.handles import Handle, handler
from backupfs.historytree import CHANGES_FILE, HistoryView
from backupfs.mountaccess import MountAccess
from backupfs.mountinfo import find_mount, raise_read_ahead
from backupfs.readops import GUEST_FILE_KINDS, ReadOperations
from backupfs.tree import BACKUP, BACKUPS, CHAIN, LATEST, ROOT, Attributes, Node, Tree
from backupfs.views import ViewCache, read_into
from engine.errors import BackupfsError
from engine.history.history import History
from engine.remote.remoterepo import RemoteRepository

log = logging.getLogger("backupfs.fs")

WORKERS = 16  # reads in flight (each may wait on a GET)


def _no_status(device: str) -> Any:
    raise BackupfsError(f"device {device}: a remote has no jobs")


class RemoteOperations(ReadOperations, pyfuse3.Operations):
    """Lookups, listings, attributes and reads of a remote's backups and their files."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, repo: RemoteRepository, mountpoint: str, files_owner_only: bool = False) -> None:
        """``files_owner_only``: as a local mount's option, the guest's files (files/,
        changes/, versions/) are the mount owner's and root's alone."""
        super().__init__()
        self.repo = repo
        self.mountpoint = mountpoint
        self.relay: Any = None  # backupfs/relay.py, once mounted (None: reads in workers)
        self._read_ahead_raised = False
        self.tree = Tree(repo, _no_status, time.time_ns())  # type: ignore[arg-type]
        self.tree.devdir_entries = [("chain", CHAIN), ("backups", BACKUPS)]  # the views add theirs
        self.inodes = self.tree.inodes
        self.views = ViewCache(repo)  # type: ignore[arg-type]
        files_cache = FilesCache(self.views)
        self.files = FilesView(self.tree, files_cache, owner_only=files_owner_only)
        self.history = HistoryView(self.tree, files_cache, History(repo, open_disk=files_cache.using),
                                   owner_only=files_owner_only)
        self.files_owner_only = files_owner_only
        self.uid, self.gid = os.getuid(), os.getgid()
        self.access = MountAccess(self.uid)  # the owner; with allow_other, others by the guest's "other" bits
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._io = trio.CapacityLimiter(WORKERS)

    def _mode(self, attrs: Attributes, kind: str) -> int:
        """Nothing is writable here; a guest's modes and symlinks are shown as they are."""
        if attrs.uid is not None or stat.S_ISLNK(attrs.mode):
            return attrs.mode
        return attrs.mode & ~0o222

    def close_views(self) -> None:
        self.files.disks.drop_all()  # the guest disks first: each holds a view
        self.views.close_all()

    # -- the relay: backup reads in its threads -------------------------------------

    def relay_read(self, fh: int, off: int, size: int, into: memoryview) -> int | None:
        """A backup's read in a relay thread (backupfs/relay.py), as BackupOperations'
        relay_read: the chain read (and the GETs it waits for) blocks this thread, with
        no hop to a worker and back through the event loop. The bytes read, or -EIO."""
        handle = self._handles.get(fh)
        view = handle.view if handle is not None else None
        if handle is None or view is None:
            return None
        try:
            return read_into(view, off, size, into)
        except (BackupfsError, OSError) as e:
            self._read_failed(handle, off, size, e)
            return -errno.EIO
        except Exception:
            log.exception("read failed")
            return -errno.EIO

    def _read_failed(self, handle: Handle, off: int, size: int, e: BaseException) -> None:
        log.warning("read of backup %s at %d (%d bytes): %s", handle.node.backup, off, size, e)
        self.tree.read_errors[handle.node.backup or ""] = str(e)

    def stop_relay(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.stop()

    def _raise_read_ahead(self) -> None:
        """1 MiB requests instead of 128 KiB (backupfs/fs.py says why it waits for an open)."""
        if self._read_ahead_raised:
            return
        self._read_ahead_raised = True
        found = find_mount(self.mountpoint)
        if found is not None:
            raise_read_ahead(found[1])

    # -- names and attributes ------------------------------------------------------------

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        """A backup's and a guest file's as a local mount's; the root's: what the cache
        fetched and served (GETs, bytes, reads met from the cache), since this mount started."""
        if node.kind == ROOT:
            stats = self.repo.cache.stats
            return {f"user.backupfs.remote_{k}".encode(): str(v).encode() for k, v in stats.items()}
        return self.tree.xattrs(node)

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.repo.path)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        out.f_bfree = out.f_bavail = out.f_ffree = out.f_favail = 0  # nothing can be written
        return out

    # -- files -------------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        self._let_in(node, ctx)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not await self._model(node, self.tree.exists, node):  # a version's looks into backups: a worker's
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.kind in GUEST_FILE_KINDS:
            return await self._open_guest(node, flags, ctx)
        if node.kind in (CHAIN, VOLUMES, CHANGES_FILE):
            return await self._open_text(node)
        handle = Handle(node)
        if node.kind == BACKUP:
            rec = self.tree.backup(node)
            try:
                handle.view = await trio.to_thread.run_sync(self.views.acquire, rec, limiter=self._io)
            except BackupfsError as e:
                self.tree.read_errors[rec.id] = str(e)
                raise
            fh = self._new_handle(handle)
            if self.relay is not None:  # its reads in the relay's threads (relay_read)
                await trio.to_thread.run_sync(self.relay.register, fh, None, limiter=self._io)
            self._raise_read_ahead()
            fi = pyfuse3.FileInfo(fh=fh)
            fi.keep_cache = True  # a backup never changes
            return fi
        if node.kind in (LATEST, FILES_LATEST):
            raise pyfuse3.FUSEError(errno.ELOOP)
        raise pyfuse3.FUSEError(errno.EISDIR)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        handle = self._handle(fh)
        if handle.guest is not None:
            return await self._read_guest(handle.guest, off, size)
        if handle.view is None:
            return handle.content[off:off + size]
        try:
            return await trio.to_thread.run_sync(handle.view.read, off, size, limiter=self._io)
        except (BackupfsError, OSError) as e:
            self._read_failed(handle, off, size, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @handler
    async def release(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if handle is not None and handle.view is not None and self.relay is not None:
            # Waits for this handle's requests in C (the kernel sends none after release).
            await trio.to_thread.run_sync(self.relay.unregister, fh, limiter=self._io)
        self._handles.pop(fh, None)
        if handle is not None and handle.view is not None and handle.node.backup:
            self.views.release(handle.node.backup)
        self._close_guest(handle)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)
