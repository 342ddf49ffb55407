"""The mounted tree's pyfuse3 handlers: they translate between the kernel and the model.

What the tree shows is backupfs/tree.py (no FUSE there); open backups are
shared through backupfs/views.py; trigger writes run jobs through
backupfs/jobs.py. This module holds what is the local mount's own: devices,
triggers, the control file, backup reads; what both mounts answer alike
(lookups, listings, attributes, guest files) is backupfs/readops.py.

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
import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import Future
from typing import Any

import pyfuse3
import trio

from backupfs.control import CONTROL_NAME
from backupfs.filescache import FilesCache
from backupfs.filestree import FILES, GUEST_KINDS, VOLUMES, FilesView
from backupfs.handles import Handle, handler
from backupfs.historytree import CHANGES, CHANGES_FILE, HISTORY_KINDS, HistoryView
from backupfs.jobs import JobRunner, SourceFactory
from backupfs.mountaccess import MountAccess
from backupfs.mountinfo import find_mount, raise_read_ahead
from backupfs.mountstatus import STATUS_XATTR
from backupfs.readbuffers import ReadBuffers
from backupfs.readops import GUEST_FILE_KINDS, ReadOperations
from backupfs.relay import inval_attrs_message, inval_entry_message
from backupfs.repocontrol import MountHooks, RepositoryControl
from backupfs.requester import Requester
from backupfs.tree import (
    BACKUP, BACKUPS, BITMAP, CHAIN, DEVDIR, DEVICE, ROOT, ROOT_INODE, SNAPSHOT, TREE_TIMEOUT, Attributes, Node,
    Tree,
)
from backupfs.views import IDLE_VIEW_BYTES, ViewCache, read_into
from backupfs.writepolicy import InlineWrites
from engine.advisor import Advisor
from engine.chain import WouldBlock
from engine.errors import BackupfsError
from engine.history.history import History
from engine.repo import Repository
from engine.validate import NAME_RE

log = logging.getLogger("backupfs.fs")

assert ROOT_INODE == pyfuse3.ROOT_INODE, "tree.py's root must be the kernel's"

# What never changes through the mount.
READ_ONLY_KINDS = frozenset((BACKUP,) + GUEST_KINDS + HISTORY_KINDS)
# MOUNT/.control: repository commands (backupfs/repocontrol.py); the mount owner's alone.
CONTROL = "control"

# A sequential reader of a backup gets the layers' data read ahead: up to
# READ_WINDOW beyond it, asked for in READ_STEP pieces (measured with
# bench/fuse_vs_qemu.py: smaller steps fight the kernel's own read-ahead
# on contiguous files, a smaller window starves deep chains).
READ_BUFFER = 1024 * 1024  # the size of a direct or read-ahead request: its buffers are reused
READ_BUFFERS = 16  # requests served at once: the kernel keeps up to 12 in flight, and compressed ones wait for decompression
READ_WINDOW = 16 * 1024 * 1024
READ_STEP = 4 * 1024 * 1024


async def _all_done(futures: list[Future[Any]]) -> None:
    """Wait on the event loop until all ``futures`` (of worker threads) are done:
    one wake-up of the loop, by the last of them, and no thread of ours."""
    futures = [f for f in futures if not f.done()]
    if not futures:
        return
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    lock = threading.Lock()
    left = [len(futures)]

    def one_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass  # the mount is gone: nobody waits

    for f in futures:
        f.add_done_callback(one_done)  # runs at once if done meanwhile
    await done.wait()


class BackupOperations(ReadOperations, pyfuse3.Operations):
    """The filesystem. Built with its repository, so tests can call it unmounted.

    Its collaborators: ``tree`` (names, attributes, texts), ``views`` (open
    backups), ``jobs`` (trigger lines). ``source_factory`` goes to the
    jobs: how backups read their sources (tests make it fail).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, repo: Repository, mountpoint: str | None = None,
                 idle_view_bytes: int = IDLE_VIEW_BYTES, source_factory: SourceFactory | None = None,
                 files_owner_only: bool = False, access: MountAccess | None = None) -> None:
        """``access``: who besides the owner gets in, and what the mount's files
        show them (backupfs/mountaccess.py); by default, the owner alone."""
        super().__init__()
        self.repo = repo
        self.mountpoint = mountpoint
        self.jobs = JobRunner(repo, on_pruned=self._forget_removed, source_factory=source_factory)
        self.tree = Tree(repo, self.jobs.status, time.time_ns())
        self.inodes = self.tree.inodes
        self.views = ViewCache(repo, idle_view_bytes)
        files_cache = FilesCache(self.views)
        self.files = FilesView(self.tree, files_cache, owner_only=files_owner_only)
        self.history = HistoryView(self.tree, files_cache, History(repo, open_disk=files_cache.using),
                                   owner_only=files_owner_only)
        self.files_owner_only = files_owner_only
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.access = access if access is not None else MountAccess(self.uid)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._io = trio.CapacityLimiter(32)
        self._buffers = ReadBuffers(READ_BUFFER, READ_BUFFERS)  # inline backup reads only
        self._read_ahead_raised = False
        self._write_policies: dict[str, InlineWrites] = {}
        self._advisor = Advisor()  # read-ahead advice for backup readers, off the event loop
        self._opening: dict[str, int] = {}  # opens under way (awaiting a worker), by device
        # The mount's request relay (backupfs/relay.py), once mounted: it serves
        # device files' reads and writes in C; None: all of it here.
        self.relay: Any = None
        self.control = RepositoryControl(repo, mountpoint, MountHooks(
            self._job_running, self._open_files, self._device_appeared, self._device_removed))
        self.tree.register(ROOT, lookup=self._root_child)
        self.tree.register(CONTROL, ROOT, check=lambda node: True, describe=self._describe_control,
                           xattrs=self._control_xattrs)

    # -- helpers ----------------------------------------------------------------

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(self.tree.attributes(node), node.kind)

    def _group(self) -> int:
        """The mount's group (``gid=``)."""
        return self.access.gid(self.gid)

    def _mode(self, attrs: Attributes, kind: str) -> int:
        """Modes masked by ``umask=``; a guest's entries keep the guest's."""
        return self.access.mode(attrs.mode, guest_owned=attrs.uid is not None, group_readable=kind == SNAPSHOT)

    def _let_in(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """ReadOperations' rule, and the control file: its commands run with the
        daemon's rights, on paths the writer names: the owner's alone, whatever
        allow_other lets in (root of another mount too)."""
        super()._let_in(node, ctx)
        if node.kind == CONTROL and ctx.uid != self.uid:
            raise pyfuse3.FUSEError(errno.EACCES)

    # -- the kernel's read-ahead, and unmount -------------------------------------

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
        self.files.disks.drop_all()
        self.views.close_all()

    # -- lookups and attributes ---------------------------------------------------------

    @handler
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        self._admit(ctx)
        if node.kind in READ_ONLY_KINDS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and node.kind not in (DEVICE, SNAPSHOT, CONTROL):
            raise pyfuse3.FUSEError(errno.EACCES)
        # A device has a fixed size, like a block device: truncation is
        # ignored (plain `dd of=device` truncates first). O_TRUNC on the
        # snapshot file (`echo full > snapshot`) is ignored too.
        return self._attrs(node)

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.inodes.node(inode)
        raise pyfuse3.FUSEError(errno.EROFS if node.kind in READ_ONLY_KINDS else errno.EPERM)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.inodes.node(inode)
        raise pyfuse3.FUSEError(errno.EROFS if node.kind in READ_ONLY_KINDS else errno.EPERM)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self._admit(ctx)
        sv = os.statvfs(self.repo.path)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                  "f_favail", "f_namemax"):
            setattr(out, f, getattr(sv, f))
        return out

    # -- directories ----------------------------------------------------------------------

    # -- files -------------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        device = node.device
        if device is not None and device in self.control.removing:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.kind == CONTROL:
            self._let_in(node, ctx)
            writing = flags & os.O_ACCMODE != os.O_RDONLY
            # The kernel runs one write of a file at a time: a second command's
            # write would wait there, unkillable, for the running one (an import:
            # minutes), then run. Its open is refused instead, as a snapshot's is.
            if writing and self.control.status.state == "running":
                raise pyfuse3.FUSEError(errno.EBUSY)
            content = self.control.status.render().encode()
            handle = Handle(node, content=content, requester=Requester.of(ctx.pid) if writing else None)
            return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True, keep_cache=False)
        if device is None:
            return await self._open(node, flags, ctx)
        # Counted while it waits for a worker: a removal then waits (repocontrol.py).
        self._opening[device] = self._opening.get(device, 0) + 1
        try:
            info = await self._open(node, flags, ctx)
        finally:
            self._opening[device] -= 1
            if not self._opening[device]:
                del self._opening[device]
        self._handles[info.fh].pid = ctx.pid
        return info

    async def _open(self, node: Node, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._let_in(node, ctx)
        if not self.tree.exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and node.kind in (DEVICE, SNAPSHOT) and not self.access.privileged(ctx.uid):
            # The kernel checks the modes too (0600, 0640); this holds whatever -o umask= made them.
            raise pyfuse3.FUSEError(errno.EACCES)
        if node.kind == DEVICE:
            assert node.device is not None
            await trio.to_thread.run_sync(self.repo.open_device, node.device, limiter=self._io)
            fh = self._new_handle(Handle(node))
            if self.relay is not None:  # in a thread: it waits for the requests in C
                await trio.to_thread.run_sync(self._relay_device, fh, node.device, limiter=self._io)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if node.kind == SNAPSHOT:
            # The kernel serialises writes to one file, so a second trigger's
            # write would wait for the running job and then start another.
            # Its open is not serialised: refuse it here, as the spec asks.
            if writing and self.jobs.running(node.device or ""):
                raise pyfuse3.FUSEError(errno.EBUSY)
            content = b"" if writing else self.tree.text(node)
            requester = Requester.of(ctx.pid) if writing else None
            fh = self._new_handle(Handle(node, content=content, requester=requester))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if node.kind in GUEST_FILE_KINDS:
            return await self._open_guest(node, flags, ctx)
        if node.kind in (CHAIN, BITMAP, VOLUMES, CHANGES_FILE):
            # A changes file's text is computed here, once per open, and its
            # size in stat is 0: direct_io makes readers read to the end
            # (backupfs/historytree.py says why).
            if writing:
                read_only = node.kind == VOLUMES or node.kind in READ_ONLY_KINDS
                raise pyfuse3.FUSEError(errno.EROFS if read_only else errno.EACCES)
            return await self._open_text(node)
        if node.kind == BACKUP:
            if writing or flags & os.O_TRUNC:
                raise pyfuse3.FUSEError(errno.EROFS)
            rec = self.tree.backup(node)
            try:
                view = await trio.to_thread.run_sync(self.views.acquire, rec, limiter=self._io)
            except (BackupfsError, OSError) as e:
                self._note_read_error(rec.id, e)
                raise
            fh = self._new_handle(Handle(node, view=view))
            if self.relay is not None:  # its reads in the relay's threads (relay_read)
                await trio.to_thread.run_sync(self.relay.register, fh, None, limiter=self._io)
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
        if handle.guest is not None:
            return await self._read_guest(handle.guest, off, size)
        if node.kind == DEVICE:
            dev = self.repo.device(node.device or "")
            try:
                # Inline when cached, as for backups (_read_backup says why).
                return dev.read(off, size, nowait=True, into=self._buffers.take(size))
            except WouldBlock:
                return await trio.to_thread.run_sync(dev.read, off, size, limiter=self._io)
        return handle.content[off : off + size]

    def _advise_sequential(self, handle: Handle, off: int) -> None:
        """A sequential reader of a backup: have the kernel read ahead of it."""
        if off == handle.next_off and handle.advised_to - off < READ_WINDOW - READ_STEP:
            start = max(handle.advised_to, off)
            self._advise(handle, start, off + READ_WINDOW - start)
            handle.advised_to = off + READ_WINDOW

    def _advise(self, handle: Handle, offset: int, length: int) -> None:
        """Have the advisor thread ask the kernel for [offset, offset+length) of the backup.

        The view is kept open until the advice has run: the reader may
        close its file first, and a view evicted meanwhile would have its
        descriptors reused by other files.
        """
        backup = handle.node.backup
        view = self.views.retain(backup) if backup else None
        if view is None:
            return
        self._advisor.submit(lambda: view.advise(offset, length), lambda: self.views.release(backup))

    async def _read_backup(self, handle: Handle, off: int, size: int) -> bytes | bytearray | memoryview:
        """Read a backup: inline when the page cache has it, else in a thread.

        A thread hop costs ~175 us, more than copying a cached MiB, so the
        read is tried first without waiting (RWF_NOWAIT) right here; only
        misses go to a worker. Sequential readers get read-ahead advice.
        """
        view = handle.view
        assert view is not None
        self._advise_sequential(handle, off)
        try:
            try:
                data = view.read(off, size, nowait=True, into=self._buffers.take(size))
            except WouldBlock:
                data = None
                # Compressed clusters: wait for the workers' decompression
                # here and read again inline (a few times: another reader's
                # may push them out of the cache meanwhile). A worker thread
                # of ours that waits or decompresses instead costs two hops,
                # reads it all again and takes a core from the workers.
                for _ in range(3):
                    waits = view.pending(off, size)
                    if not waits:
                        break  # none under way: the page cache's miss
                    await _all_done(waits)
                    try:
                        data = view.read(off, size, nowait=True, into=self._buffers.take(size))
                        break
                    except WouldBlock:
                        pass
                if data is None:
                    data = await trio.to_thread.run_sync(view.read, off, size, limiter=self._io)
        except (BackupfsError, OSError) as e:
            self._note_read_error(handle.node.backup or "", e)
            raise
        handle.next_off = off + len(data)
        return data

    def _note_read_error(self, backup: str, e: BaseException) -> None:
        """Keep why a read of ``backup`` failed (its reader gets only an errno)
        as its user.backupfs.read_error attribute (the kernel does not cache
        attributes, so the next getfattr sees it): one string a backup."""
        if isinstance(e, OSError) and e.strerror:
            reason = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        else:
            reason = str(e)
        self.tree.read_errors[backup] = reason

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
            await self.jobs.trigger(node.device or "", buf, handle.requester, handle)
            return len(buf)
        if node.kind == CONTROL:
            # The writer reads the outcome back from this same open file.
            err, outcome = await self.control.run(buf, handle.requester)
            handle.content = json.dumps(outcome).encode() + b"\n"
            if err:
                raise pyfuse3.FUSEError(err)
            return len(buf)
        raise pyfuse3.FUSEError(errno.EROFS if node.kind in READ_ONLY_KINDS else errno.EACCES)

    def _write_policy(self, device: str) -> InlineWrites:
        policy = self._write_policies.get(device)
        if policy is None:
            policy = self._write_policies[device] = InlineWrites()
        return policy

    async def _forget_removed(self, device: str, before: set[str]) -> None:
        """The kernel caches backup entries for long: tell it which are gone,
        and let new opens of rewritten backups see their new images.

        Done before the trigger returns, so the script that pruned sees it.
        (The kernel takes the backups directory's lock, not the snapshot
        file's, so this cannot wait on the request we are serving.)
        """
        after = {b.id for b in self.repo.backups(device)}
        backups_dir = self.inodes.get(BACKUPS, device).inode
        files_dir = self.inodes.get(FILES, device).inode
        changes_dir = self.inodes.get(CHANGES, device).inode
        for b in before:  # gone, or rewritten by a merge: what their reads said is stale
            self.tree.read_errors.pop(b, None)
        for gone in sorted(before - after):
            await trio.to_thread.run_sync(self._invalidate, backups_dir, gone.encode())
            await trio.to_thread.run_sync(self._invalidate, files_dir, gone.encode())
            await trio.to_thread.run_sync(self._invalidate, changes_dir, gone.encode())
        self.files.disks.drop_all()
        self.history.invalidated(device)  # kept backups may have another parent now
        for kept in sorted(after):  # children of a removed one were rewritten: new st_blocks
            inode = self.inodes.get(BACKUP, device, kept).inode
            await trio.to_thread.run_sync(self._invalidate_attrs, inode)
        self.views.drop_stale()

    # -- MOUNT/.control: devices added and removed while mounted ----------------------------

    def _root_child(self, parent: Node, name: bytes) -> Node | None:
        """The root's entry ``name``: a device (one catalog row), or the control file
        (not listed: the root lists the devices, and scripts walk MOUNT/*)."""
        if name == CONTROL_NAME.encode():
            return self.inodes.get(CONTROL)
        try:
            text = name.decode()
        except UnicodeDecodeError:
            return None
        if not NAME_RE.fullmatch(text) or text in self.control.removing or self.repo.device_record(text) is None:
            return None
        return self.inodes.get(DEVDIR, text)

    def _describe_control(self, node: Node, a: Attributes) -> None:
        a.mode = stat.S_IFREG | 0o600
        a.entry_timeout = TREE_TIMEOUT  # the name is there for the life of the mount
        a.size = 0  # read through direct I/O: its text is whatever the last command left

    def _control_xattrs(self, node: Node) -> dict[bytes, bytes]:
        return {STATUS_XATTR.encode(): json.dumps(self.control.status.fields()).encode()}

    def _job_running(self, device: str) -> str | None:
        if not self.jobs.running(device):
            return None
        st = self.jobs.status(device)
        by = f", requested by {st.requester}" if st.requester else ""
        return f"{st.command}: {st.progress_line()}{by}"

    def _open_files(self, device: str) -> list[str]:
        """What of ``device`` is open in the mount, and by whom (directories aside)."""
        out = []
        for h in self._handles.values():
            node = h.node
            if node.device != device or h.entries:
                continue
            if node.kind == DEVICE:
                what = "its device file"
            elif node.kind == BACKUP:
                what = f"backup {node.backup}"
            elif h.guest is not None:
                what = f"a file in backup {node.backup}"
            else:
                what = f"its {node.kind} file"
            out.append(f"{what} is open by {_process(h.pid)}")
        if self._opening.get(device):
            out.append(f"{self._opening[device]} open{'s are' if self._opening[device] > 1 else ' is'} under way")
        return out

    async def _device_appeared(self, device: str) -> None:
        """A name the kernel may hold as missing (a lookup before the add) is looked up again."""
        await trio.to_thread.run_sync(self._invalidate, ROOT_INODE, device.encode())

    async def _device_removed(self, device: str) -> None:
        """Drop the device's name from the kernel's cache (with everything below it),
        and what the mount kept of it: a device added again under that name starts afresh."""
        await trio.to_thread.run_sync(self._invalidate, ROOT_INODE, device.encode())
        if self.repo.device_record(device) is not None:
            return  # the removal failed: it is all still there
        self._write_policies.pop(device, None)
        self.jobs.forget(device)
        self.files.disks.drop_all()
        self.history.invalidated(device)
        self.views.drop_stale()

    def _invalidate(self, parent: int, name: bytes) -> None:
        try:
            if self.relay is not None:  # the relay holds the device: pyfuse3 would write to its socket
                err = self.relay.notify(inval_entry_message(parent, name))
                if err:
                    raise OSError(err, os.strerror(err))
            else:
                pyfuse3.invalidate_entry(parent, name)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel had not cached it
                log.warning("cannot invalidate %r: %s", name, e)

    def _invalidate_attrs(self, inode: int) -> None:
        try:
            if self.relay is not None:
                err = self.relay.notify(inval_attrs_message(inode))
                if err:
                    raise OSError(err, os.strerror(err))
            else:
                pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel had not cached it
                log.warning("cannot invalidate inode %d: %s", inode, e)

    @handler
    async def flush(self, fh: int) -> None:
        self._handle(fh)  # writes go straight to the source: nothing buffered here

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        if handle.node.kind == DEVICE:
            dev = self.repo.device(handle.node.device or "")
            await trio.to_thread.run_sync(dev.fsync, limiter=self._io)

    def stop_relay(self) -> None:
        """Stop the relay (pyfuse3's loop has ended): from here on pyfuse3 holds
        the FUSE device again, and invalidations go through it."""
        relay, self.relay = self.relay, None
        if relay is None:
            return
        device, backup_reads, passed = relay.stats()
        log.info("relay: %d device requests served in C, %d backup reads in its threads, %d requests passed "
                 "to pyfuse3", device, backup_reads, passed)
        relay.stop()

    def relay_read(self, fh: int, off: int, size: int, into: memoryview) -> int | None:
        """A backup's read, in a relay thread (backupfs/_relay.c): the bytes
        read into ``into``, -errno, or None to leave it to pyfuse3.

        What _read_backup does on the loop, without the loop: the chain read
        blocks here (it releases the GIL for the disk), so nothing waits for
        a worker or for an event loop turn, and the reply leaves from this
        thread. Errors become an errno and the backup's read_error, as the
        handler does for the loop's reads.
        """
        handle = self._handles.get(fh)
        view = handle.view if handle is not None else None
        if handle is None or view is None:
            return None
        try:
            self._advise_sequential(handle, off)
            n = read_into(view, off, size, into)
        except (BackupfsError, OSError) as e:
            self._note_read_error(handle.node.backup or "", e)
            if isinstance(e, BackupfsError):
                log.info("read: %s", e)
            else:
                log.warning("read: %s", e)
            return -(e.errno or errno.EIO)
        except Exception:
            log.exception("read failed")
            return -errno.EIO
        handle.next_off = off + n
        return n

    def _relay_device(self, fh: int, device: str) -> None:
        """Have the relay serve this handle's plain reads and writes in C
        (engine/_devio.c declines the rest, which come here)."""
        io = self.repo.device(device).io
        try:
            self.relay.register(fh, io)
        except TypeError:
            pass  # built without the C device path: served here

    @handler
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.node.kind in (DEVICE, BACKUP) and self.relay is not None:
            # Waits for this handle's requests in C (the kernel sends none after release).
            await trio.to_thread.run_sync(self.relay.unregister, fh, limiter=self._io)
        if handle is not None and handle.view is not None and handle.node.backup:
            self.views.release(handle.node.backup)
        self._close_guest(handle)

    # -- what the tree does not allow ----------------------------------------------------

    def _refuse(self, parent_inode: int) -> pyfuse3.FUSEError:
        parent = self.inodes.node(parent_inode)
        read_only = parent.kind in (BACKUPS, FILES) or parent.kind in READ_ONLY_KINDS
        return pyfuse3.FUSEError(errno.EROFS if read_only else errno.EPERM)

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


def _process(pid: int) -> str:
    """'pid 4711 (qemu-system-x86)': who holds a file, for a refusal to say."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f"pid {pid} ({f.read().decode(errors='replace').strip()})"
    except OSError:
        return f"pid {pid}" if pid > 0 else "a process"
