"""The read-only filesystem of a remote mount (`backupfs mount s3://BUCKET/PREFIX MOUNT`).

The same tree model as a local mount (backupfs/tree.py) over a
``RemoteRepository`` (engine/remote/remoterepo.py): ``<device>/backups/<id>``,
``latest`` and ``chain``, with the same sizes, times and extended
attributes. A remote has no live disk, no jobs and no control file, so a
device's directory shows only ``chain`` and ``backups``; the kernel mount is
``ro`` (every write is EROFS before it reaches us).

Kept apart from backupfs/fs.py, whose operations are built around a local
repository's jobs, devices and control file: this one only looks up,
lists, describes and reads. A backup is always read in a worker thread
(a read may wait for the network); the chain under it fetches what it is
about to read through the object cache, and a remote that stops answering
fails that read with EIO once the store's timeouts run out.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import pyfuse3
import trio

from backupfs.fs import Handle, HandleTable, handler
from backupfs.mountinfo import find_mount, raise_read_ahead
from backupfs.tree import BACKUP, BACKUPS, CHAIN, LATEST, ROOT, Attributes, Node, Tree
from backupfs.views import ViewCache, read_into
from engine.errors import BackupfsError
from engine.remote.remoterepo import RemoteRepository

log = logging.getLogger("backupfs.fs")

WORKERS = 16  # reads in flight (each may wait on a GET)


def _no_status(device: str) -> Any:
    raise BackupfsError(f"device {device}: a remote has no jobs")


class RemoteOperations(HandleTable, pyfuse3.Operations):
    """Lookups, listings, attributes and reads of a remote's backups."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, repo: RemoteRepository, mountpoint: str) -> None:
        super().__init__()
        self.repo = repo
        self.mountpoint = mountpoint
        self.relay: Any = None  # backupfs/relay.py, once mounted (None: reads in workers)
        self._read_ahead_raised = False
        self.tree = Tree(repo, _no_status, time.time_ns())  # type: ignore[arg-type]
        self.tree.devdir_entries = [("chain", CHAIN), ("backups", BACKUPS)]
        self.inodes = self.tree.inodes
        self.views = ViewCache(repo)  # type: ignore[arg-type]
        self.uid, self.gid = os.getuid(), os.getgid()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._io = trio.CapacityLimiter(WORKERS)

    def _entry(self, attrs: Attributes) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = attrs.inode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_nlink = attrs.nlink
        a.st_blksize = attrs.blksize
        a.entry_timeout = attrs.entry_timeout
        a.attr_timeout = attrs.attr_timeout
        a.st_mode = attrs.mode & ~0o222  # nothing is writable here
        a.st_size = attrs.size
        a.st_blocks = attrs.blocks
        a.st_mtime_ns = a.st_atime_ns = a.st_ctime_ns = attrs.mtime_ns
        return a

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(self.tree.attributes(node))

    def close_views(self) -> None:
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
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        child = self.tree.child(self.inodes.node(parent_inode), name)
        attrs = self._attrs(child)
        self.inodes.looked_up(child)
        return attrs

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        if not self.tree.exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(node)

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.tree.link_target(self.inodes.node(inode))

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        """A backup's as a local mount's; the root's: what the cache fetched and served
        (GETs, bytes, reads met from the cache), since this mount started."""
        if node.kind == ROOT:
            stats = self.repo.cache.stats
            return {f"user.backupfs.remote_{k}".encode(): str(v).encode() for k, v in stats.items()}
        return self.tree.xattrs(node)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(self.inodes.node(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(self.inodes.node(inode)))

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

    # -- directories ----------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.node(inode)
        if not self.tree.exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        entries = [(b".", node), (b"..", self.tree.parent(node))] + self.tree.children(node)
        return self._new_handle(Handle(node, entries=entries))

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)
        for i, (name, node) in enumerate(handle.entries[start_id:], start_id):
            attrs = self._entry(self.tree.attributes(node))
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break
            if i >= 2:  # the kernel counts a lookup for each entry but `.` and `..`
                self.inodes.looked_up(node)

    @handler
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    # -- files -------------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
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
        if node.kind == LATEST:
            raise pyfuse3.FUSEError(errno.ELOOP)
        if node.kind != CHAIN:
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle.content = self.tree.text(node)
        fi = pyfuse3.FileInfo(fh=self._new_handle(handle))
        fi.direct_io = True  # rendered at open: its size may differ from the last getattr's
        return fi

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        handle = self._handle(fh)
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

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)
