"""The read-only requests both mounts answer alike: names, attributes, listings, and guest files.

The local mount (backupfs/fs.py ``BackupOperations``) and the remote mount
(backupfs/remotefs.py ``RemoteOperations``) show the same tree model
(backupfs/tree.py), files view (backupfs/filestree.py) and history
(backupfs/historytree.py). How a lookup, a getattr, a listing or a symlink
is answered, who may see a backup's guest files, and how a guest file is
opened, read and closed does not depend on where the images are: it lives
here once, and each mount class keeps only what is its own (devices,
triggers and the control file locally; the object cache remotely).

What a class using ``ReadOperations`` provides: ``tree``, ``inodes``,
``files`` (a FilesView), ``history`` (a HistoryView), ``access`` (a
MountAccess), ``files_owner_only``, ``_io`` (the worker limiter),
``_handles``/``_next_fh`` (HandleTable), ``uid``/``gid`` (the mount's
owner), ``_mode(attrs, kind)`` (the modes it shows; ``_group()`` if its
own files take another group) and ``_raise_read_ahead()``.

Everything that reads a guest (a listing, a lookup, an attribute of a
guest entry, a file's bytes) runs in a worker thread: a cold backup's
filesystem costs seconds to parse, and on a remote mount every read may
wait for the network.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from backupfs.filestree import GUEST, GUEST_KINDS, FilesView
from backupfs.handles import GuestFile, Handle, HandleTable, handler
from backupfs.historytree import HISTORY_KINDS, VERSION_FILE, HistoryView
from backupfs.mountaccess import MountAccess, guest_allows
from backupfs.tree import Attributes, InodeTable, Node, RequestError, Tree
from engine.errors import BackupfsError

log = logging.getLogger("backupfs.fs")

T = TypeVar("T")

# What shows a guest's names or bytes: ``files_owner_only`` keeps other users out.
PRIVATE_KINDS = frozenset(GUEST_KINDS + HISTORY_KINDS)
# Files inside a backup that are opened as a guest's file (its bytes read from the guest filesystem).
GUEST_FILE_KINDS = (GUEST, VERSION_FILE)


class ReadOperations(HandleTable):
    """Lookups, attributes, xattrs, listings and guest files, for a pyfuse3.Operations class."""

    tree: Tree
    inodes: InodeTable
    files: FilesView
    history: HistoryView
    access: MountAccess
    files_owner_only: bool
    _io: trio.CapacityLimiter

    uid: int
    gid: int

    def _entry(self, attrs: Attributes, kind: str) -> pyfuse3.EntryAttributes:
        """The model's attributes as the kernel takes them: the mount's own files
        owned by its user (and ``_group()``), a guest's entries with the guest's
        owners and times; each mount says what modes it shows (``_mode``)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = attrs.inode
        a.st_uid = self.uid if attrs.uid is None else attrs.uid
        a.st_gid = self._group() if attrs.gid is None else attrs.gid
        a.st_rdev = attrs.rdev
        a.st_nlink = attrs.nlink
        a.st_blksize = attrs.blksize
        a.entry_timeout = attrs.entry_timeout
        a.attr_timeout = attrs.attr_timeout
        a.st_mode = self._mode(attrs, kind)
        a.st_size = attrs.size
        a.st_blocks = attrs.blocks
        a.st_mtime_ns = attrs.mtime_ns
        a.st_atime_ns = attrs.mtime_ns if attrs.atime_ns is None else attrs.atime_ns
        a.st_ctime_ns = attrs.mtime_ns if attrs.ctime_ns is None else attrs.ctime_ns
        return a

    def _group(self) -> int:
        """The group of the mount's own files."""
        return self.gid

    def _mode(self, attrs: Attributes, kind: str) -> int:
        raise NotImplementedError

    def _raise_read_ahead(self) -> None:
        raise NotImplementedError

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(self.tree.attributes(node), node.kind)

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        """A node's extended attributes (a mount may add its own, as the remote's root)."""
        return self.tree.xattrs(node)

    async def _model(self, node: Node, fn: Callable[..., T], *args: Any, attributes: bool = False) -> T:
        """Ask the tree model: inline, or in a worker for the kinds that read a guest
        (``attributes``: a getattr or xattr request, inline for the kinds whose
        attributes read nothing: `ls -l files/` of 1,000 backups hopped 1,000 times)."""
        if node.kind in self.tree.blocking_kinds and not (
                attributes and node.kind in self.tree.quick_attribute_kinds):
            return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._io)
        return fn(*args)

    # -- who gets in ------------------------------------------------------------------

    def _admit(self, ctx: pyfuse3.RequestContext) -> None:
        """``allow_group``: the owner, root and the group's members; EACCES for the rest."""
        if self.access.group is not None and not self.access.lets_in(ctx.uid, ctx.gid, ctx.pid):
            raise pyfuse3.FUSEError(errno.EACCES)

    def _let_in(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """``_admit``; and ``files_owner_only``: a backup's files are the mount owner's (and root's) alone."""
        self._admit(ctx)
        if self.files_owner_only and node.kind in PRIVATE_KINDS and not self.access.privileged(ctx.uid):
            raise pyfuse3.FUSEError(errno.EACCES)

    async def _guest_grants(self, node: Node, ctx: pyfuse3.RequestContext, want: int) -> None:
        """Anyone but the owner and root gets into a guest's own entries only by
        their "other" bits (mountaccess.guest_allows says why): the kernel has
        already checked the modes against the caller's uid and groups, which
        may coincide with a guest's by chance."""
        if node.kind not in PRIVATE_KINDS or self.access.privileged(ctx.uid):
            return
        if not await self._model(node, self._others_reach, node, want, attributes=True):
            raise pyfuse3.FUSEError(errno.EACCES)

    def _others_reach(self, node: Node, want: int) -> bool:
        """Whether the guest lets everyone ``want`` on ``node`` and search every
        guest directory above it. The directories too: a path the owner has
        walked is kept by the kernel, and a walk through it is checked only
        against the modes, where a uid that equals the guest's passes."""
        attrs = self.tree.attributes(node)
        if attrs.uid is not None and not guest_allows(attrs.mode, want):
            return False
        while attrs.uid is not None:
            node = self.tree.parent(node)
            if node.kind not in PRIVATE_KINDS:
                break
            attrs = self.tree.attributes(node)
            if attrs.uid is not None and not guest_allows(attrs.mode, os.X_OK):
                return False
        return True

    # -- names and attributes -----------------------------------------------------------

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self._let_in(parent, ctx)
        await self._guest_grants(parent, ctx, os.X_OK)
        child, attrs = await self._model(parent, self._child_attrs, parent, name)
        self.inodes.looked_up(child)
        return attrs

    def _child_attrs(self, parent: Node, name: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        child = self.tree.child(parent, name)
        return child, self._attrs(child)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        self._admit(ctx)
        return await self._model(node, self._existing_attrs, node, attributes=True)

    def _existing_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        if not self.tree.exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        self._let_in(node, ctx)
        return await self._model(node, self.tree.link_target, node)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        self._let_in(node, ctx)
        await self._guest_grants(node, ctx, os.R_OK)
        values = await self._model(node, self._xattrs, node, attributes=True)
        value = values.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.inodes.node(inode)
        self._let_in(node, ctx)
        await self._guest_grants(node, ctx, os.R_OK)
        return list(await self._model(node, self._xattrs, node, attributes=True))

    @handler
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # The fixed tree's numbers live as long as the mount; a guest's
        # files are dropped when the kernel lets go of them.
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    # -- directories ----------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.node(inode)
        self._let_in(node, ctx)
        await self._guest_grants(node, ctx, os.R_OK)
        handle = await self._model(node, self._listed, node)
        return self._new_handle(handle)

    def _listed(self, node: Node) -> Handle:
        if not self.tree.exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        # `.` and `..` first, as every local file system lists them (`ls -a`,
        # and tools that count a directory's entries, expect them).
        dots = [(b".", node), (b"..", self.tree.parent(node))]
        if node.kind == GUEST:  # described from the one listing (FilesView.described_children says why)
            described = self.files.described_children(node)
            handle = Handle(node, entries=dots + [(name, child) for name, child, _ in described])
            handle.attrs = [self._described(name, child) for name, child in dots]
            handle.attrs += [attrs for _, _, attrs in described]
            return handle
        entries = dots + self.tree.children(node)
        handle = Handle(node, entries=entries)
        if node.kind in self.tree.blocking_kinds:  # described here, off the event loop
            handle.attrs = [self._described(name, child) for name, child in entries]
        return handle

    def _described(self, name: bytes, node: Node) -> Attributes | None:
        try:
            return self.tree.attributes(node)
        except (RequestError, BackupfsError) as e:
            # Vanished since opendir, or cannot be described now: the
            # rest of the listing still shows.
            log.info("readdir: leaving out %r: %s", name, e)
            return None

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handle(fh)
        for i, (name, node) in enumerate(handle.entries[start_id:], start_id):
            attrs = handle.attrs[i] if handle.attrs else self._described(name, node)
            if attrs is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(attrs, node.kind), i + 1):
                break
            if i >= 2:  # the kernel counts a lookup for each entry but `.` and `..`
                self.inodes.looked_up(node)

    @handler
    async def releasedir(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.attrs:
            self.inodes.drop_unheld([node for _, node in handle.entries[2:]])

    # -- guest files and rendered texts ---------------------------------------------------

    async def _open_guest(self, node: Node, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """A file inside a backup (``files/``) or a version of one (``versions/``):
        its backup's guest disk held open until release, its data found once."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        await self._guest_grants(node, ctx, os.R_OK)
        opener = self.files.open_file if node.kind == GUEST else self.history.open_file
        disk, rec, volume, data = await trio.to_thread.run_sync(opener, node, limiter=self._io)
        fh = self._new_handle(Handle(node, guest=GuestFile(disk, rec, volume, data)))
        self._raise_read_ahead()
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=True)  # a backup never changes

    async def _open_text(self, node: Node) -> pyfuse3.FileInfo:
        """A text rendered at open, in a worker (a chain, ``volumes``, a ``changes``
        file: that one's diff may take seconds), served with direct_io: its size
        in stat may differ from the text's (backupfs/historytree.py says why)."""
        content = await trio.to_thread.run_sync(self.tree.text, node, limiter=self._io)
        fh = self._new_handle(Handle(node, content=content))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def _read_guest(self, guest: GuestFile, off: int, size: int) -> bytes:
        """A guest file's bytes, in a worker (parsed runs of the backup, maybe fetched)."""
        return await trio.to_thread.run_sync(guest.volume.read_data, guest.data, off, size, limiter=self._io)

    def _close_guest(self, handle: Handle | None) -> None:
        """Let go of an open guest file's disk (the last use of an evicted one closes it)."""
        if handle is not None and handle.guest is not None:
            self.files.close_file(handle.guest.rec, handle.guest.disk)
