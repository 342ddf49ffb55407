"""The repository: the one facade the CLI and the filesystem call.

The layout of its directory and the names of its files are engine/layout.py's.

A backup becomes visible in four durable steps: image (data, tables,
header, fsync), checksums (fsync), rename into place (fsync of the
directory), catalog row (commit). A crash before the last leaves files the
next open removes; the bitmap, persisted as in use, is then untrusted, so
the next incremental compares checksums and copies whatever changed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from engine import durable
from engine.access import Access, make_dir, notices, secure
from engine.bitmap import validate_granularity
from engine.catalog import DISK_FULL, KINDS, BackupRecord, Catalog, CatalogError, DeviceRecord, JobRecord
from engine.ceph import is_rbd
from engine.chain import ChainView
from engine.checksums import ChecksumError, ChecksumRecord, Unrecorded, granule_hashes, overlay
from engine.device import Device, DeviceError, distrust_saved_bitmaps
from engine.errors import BackupfsError, UsageError
from engine.fsutil import fsync_dir
from engine.limits import check_granules
from engine.damage import advice as damage_advice
from engine.integrity import Problem, VerifiedView, VerifyReport, held_granules, verify_backup
from engine.units import check_rate, format_size
from engine.restore import RestoreResult, check_in_place_target, check_target, restore_to, source_named
from engine.rbddevice import RbdDevice, probe_rbd
from engine.rbdsnaps import remove_rbd_snapshots
from engine.sourcecheck import probe_source
from engine.sourceid import FILE, SourceId, identity_at
from engine.importer import import_chain
from engine.prune import PrunePreview, RemovalPlan, RetentionPolicy, keep_reasons, remove_backup, select_for_removal
from engine.layout import BITMAPS, CATALOG, DEVICES, LOCK, bitmap_name, bitmap_tmp_name, device_dir, \
    device_rel, file_rel, matching_ids
from engine.backuprun import BackupResult, BackupRun
from engine.repoerrors import JobBusy, RepositoryError, storage_error
from engine.job import (
    CHUNK_BYTES,
    BackupJob,
    JobCancelled,
    Progress,
    Source,
    cancelled,
)
from engine.qcow2.format import validate_compress
from engine.remote.location import RemoteSpec
from engine.qcow2.writer import validate_cluster_size
from engine.text import escape
from engine.validate import NAME_RE, validate_label

if TYPE_CHECKING:
    from engine.remote.push import PushResult
    from engine.guest.guestdisk import GuestDisk
    from engine.history.history import History

DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_GRANULARITY = 64 * 1024


def remote_named(catalog: Catalog, name: str) -> RemoteSpec:
    """The remote recorded as ``name``, or a clear refusal naming those there are."""
    remotes = catalog.remotes()
    for spec in remotes:
        if spec.name == name:
            return spec
    known = ", ".join(r.name for r in remotes) or "none; add one with 'backupfs remote add'"
    raise UsageError(f"no remote named {name!r} (remotes: {known})")


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):  # match() with $ lets a trailing newline through
        raise UsageError(
            f"invalid device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


def _what_runs(pid: str) -> str:
    """' (backupfs backup REPO vm1 full)': what the lock's owner is doing,
    from its command line, so the refusal says who to wait for."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except (OSError, ValueError):
        return ""
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python") and argv[1].endswith("backupfs"):
        argv = argv[1:]  # the console script run by its interpreter
    if not argv:
        return ""
    text = " ".join([os.path.basename(argv[0])] + argv[1:])
    return f" ({text[:117] + '...' if len(text) > 120 else text})"


def _make_private(path: str, catalog: Catalog) -> None:
    """Bring the repository's modes to what it was made for (private, or its
    group's), telling the user once if anyone else could read it: a
    repository of an older version, made under umask 022, was world-readable."""
    access = Access(catalog.group())
    try:
        opened_up = secure(path, access)
    except OSError as e:
        raise RepositoryError(f"{e.filename or path}: cannot make the repository {access.describe()}: "
                              f"{e.strerror}", e.errno or errno.EIO) from None
    if opened_up:
        notices.warning("%s was readable by other users; made it %s", path, access.describe())


class Repository:
    """An open repository, owned by this process until ``close``."""

    def __init__(self, path: str, lock_fd: int, catalog: Catalog) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.catalog = catalog
        self._devices: dict[str, Device] = {}
        self._devices_lock = threading.Lock()
        self._away: set[str] = set()  # devices let go while their record changes (``_let_go``)
        # The st_dev of this repository's own FUSE mount, set by its daemon: a
        # source there would be read through the mount by the daemon itself,
        # which hangs it for good (Device opens its source under _devices_lock,
        # and the open of the mount's device file needs that lock).
        self.mount_dev: int | None = None
        self._running: dict[str, BackupJob] = {}
        self._maintenance: set[str] = set()  # devices being pruned
        self._idle = threading.Condition()
        self._writable = True  # False: opened by a command that only reads

    # -- lifecycle --------------------------------------------------------------

    @staticmethod
    def init(path: str, group: int | None = None) -> None:
        """Create an empty repository at ``path``: private, or readable by
        group ``group`` (a gid) too; see engine/access.py."""
        path = os.path.abspath(path)
        access = Access(group)
        if os.path.exists(os.path.join(path, CATALOG)):
            raise RepositoryError(f"{path} is already a backupfs repository", errno.EEXIST)
        if os.path.exists(path) and not os.path.isdir(path):
            raise RepositoryError(f"{path} exists and is not a directory", errno.ENOTDIR)
        if os.path.isdir(path) and os.listdir(path):
            raise RepositoryError(f"{path} is not empty; give a new or empty directory", errno.ENOTEMPTY)
        made_dir = not os.path.exists(path)
        building = os.path.join(path, CATALOG + ".new")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            make_dir(path, access)
            secure(path, access)  # or the empty directory given, whatever its mode was
            make_dir(os.path.join(path, DEVICES), access)
            # Built under another name and renamed: a repository is there
            # whole, or not at all (a full disk used to leave an empty
            # catalog that made the directory neither usable nor new).
            Catalog.create(building, group).close()
            durable.fs.replace(building, os.path.join(path, CATALOG))
            fsync_dir(path)
        except (OSError, sqlite3.Error) as e:
            for leftover in (building, building + "-wal", building + "-shm"):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
            try:
                os.rmdir(os.path.join(path, DEVICES))
                if made_dir:
                    os.rmdir(path)
            except OSError:
                pass
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise RepositoryError(f"cannot create a repository in {path}: {reason}", errno.EIO) from None

    @staticmethod
    def check_exists(path: str) -> None:
        """Refuse, in the words ``open`` uses, a path that holds no repository
        (for commands that read beside its owner without opening it)."""
        if not os.path.exists(os.path.join(os.path.abspath(path), CATALOG)):
            raise RepositoryError(
                f"{os.path.abspath(path)} is not a backupfs repository (run 'backupfs init {os.path.abspath(path)}')",
                errno.ENOENT)

    @classmethod
    def open(cls, path: str, *, writable: bool = True) -> Repository:
        """Open and lock the repository; ``writable`` False for a command that
        only reads (list, status, verify): it then deletes nothing, and what
        interrupted work left waits for the next command that may write."""
        path = os.path.abspath(path)
        if not os.path.exists(os.path.join(path, CATALOG)):
            raise RepositoryError(
                f"{path} is not a backupfs repository (run 'backupfs init {path}')", errno.ENOENT
            )
        lock_path = os.path.join(path, LOCK)
        try:
            # Never through a symlink: as root, a planted link would let any
            # command overwrite the file it points to with our pid.
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                              | os.O_NONBLOCK, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RepositoryError(f"{lock_path} is a symlink; refusing to use it as the lock") from None
            raise RepositoryError(f"{lock_path}: cannot open the lock: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(lock_fd).st_mode):
            os.close(lock_fd)
            raise RepositoryError(f"{lock_path} is not a regular file; refusing to use it as the lock")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise RepositoryError(f"repository {path} is in use by pid {owner}{_what_runs(owner)}",
                                  errno.EBUSY) from None
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # only for "in use by pid N"; a full disk must not stop a `list`
        try:
            catalog = Catalog.open(os.path.join(path, CATALOG))
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            _make_private(path, catalog)
            # Every row checked once, up front: a catalog changed outside
            # backupfs is refused by every command, the mount included,
            # before anything it names is opened or removed.
            _check_real_dirs(path, [d.name for d in catalog.devices()])
            catalog.backups()
            repo = cls(path, lock_fd, catalog)
            repo._writable = writable
            repo._recover()
        except BaseException:
            catalog.close()
            os.close(lock_fd)
            raise
        return repo

    def _require_room(self, what: str) -> None:
        """Refuse work that must record something while the catalog is frozen."""
        if self.catalog.frozen:
            raise RepositoryError(
                f"{self.path}: {self.catalog.frozen}, and {what} must be recorded in its catalog; "
                "free some space on that disk first (list, status, verify and restore still work)",
                errno.ENOSPC,
            )

    def _recover(self) -> None:
        """Remove what interrupted jobs left behind: only the files they
        recorded as in progress (intents), never anything else."""
        if self.catalog.frozen:
            return  # read-only until there is room; the next open does this
        try:
            self.catalog.mark_interrupted_jobs()
        except CatalogError as e:
            if e.errno != errno.ENOSPC:
                raise
            # A crash left the WAL, so the catalog opened normally, but there
            # is no room to record anything: read-only until there is.
            self.catalog.frozen = DISK_FULL
            return
        devroot = os.path.join(self.path, DEVICES)
        missing = [d.name for d in self.catalog.devices() if not os.path.isdir(self._device_dir(d.name))]
        for name in missing:
            # Lost by a crash of an older version, which did not make the
            # new directory durable: the device's bitmaps and backups need it.
            make_dir(devroot)
            make_dir(self._device_dir(name))
        if missing:
            fsync_dir(devroot)
        if not self._writable:
            return  # a command that only reads deletes nothing
        self._remove_recorded(self.catalog.intents())
        for d in self.catalog.devices():
            # A bitmap save (atomic_write) interrupted: its fixed temporary name.
            for which in BITMAPS:
                self._remove_file(file_rel(d.name, bitmap_tmp_name(which)))
        for backup_id in self.catalog.pending_removals():
            rec = self.catalog.backup(backup_id)
            if rec is not None:
                # An interrupted prune: finish it (see engine/prune.py).
                self._remove_one(rec.device, RemovalPlan(rec, self.catalog.children(rec.id)), None,
                                 verified=False)

    def forget_intents(self, paths: list[str]) -> None:
        """Clear intents whose files are settled; failing that (a full disk),
        the next open finds them settled and clears them."""
        if paths:
            try:
                self.catalog.clear_intents(paths)
            except CatalogError:
                pass

    def _remove_recorded(self, intents: list[tuple[str, str]]) -> None:
        """Remove what interrupted work recorded it was making, then forget it.

        A path the catalog names is a committed backup's (the intent
        outlived its commit): it stays. Files first, then the directories
        an import made (only if empty and no device has them).
        """
        if not intents:
            return
        known = {b.image for b in self.catalog.backups()} | {
            b.checksums for b in self.catalog.backups() if b.checksums
        }
        for rel, kind in intents:
            if kind != "dir" and rel not in known:
                self._remove_file(rel)
        for rel, kind in intents:
            if kind == "dir":
                self._remove_empty_device_dir(rel)
        self.catalog.clear_intents([rel for rel, _kind in intents])

    def _device_dir_fd(self, name: str) -> int | None:
        """The device's directory, opened without following a symlink
        anywhere below the repository: one that is a link is never entered."""
        try:
            root = os.open(os.path.join(self.path, DEVICES), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                           | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        except OSError:  # gone, or a symlink (ELOOP, ENOTDIR)
            return None
        finally:
            os.close(root)

    def _remove_file(self, rel: str) -> None:
        """Unlink ``devices/NAME/FILE`` if it is a regular file directly in
        the device's real directory; anything else (a symlink, a directory,
        a path of another shape) is left alone."""
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != DEVICES or not NAME_RE.fullmatch(parts[1]) \
                or parts[2] in ("", ".", ".."):
            return
        dir_fd = self._device_dir_fd(parts[1])
        if dir_fd is None:
            return
        try:
            try:
                st = os.stat(parts[2], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISREG(st.st_mode):
                os.unlink(parts[2], dir_fd=dir_fd)
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _remove_empty_device_dir(self, rel: str) -> None:
        """rmdir ``devices/NAME`` that an interrupted import made, if no device has it and it is empty."""
        parts = rel.split("/")
        if len(parts) != 2 or parts[0] != DEVICES or not NAME_RE.fullmatch(parts[1]):
            return
        if self.catalog.device(parts[1]) is not None:
            return
        try:
            root = os.open(os.path.join(self.path, DEVICES), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                           | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.stat(parts[1], dir_fd=root, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(parts[1], dir_fd=root)
                os.fsync(root)
        except OSError:
            pass  # gone already, or the user put something there: it stays
        finally:
            os.close(root)

    def cancel_jobs(self, reason: str = "the repository is being closed") -> None:
        """Ask every running job to stop (they fail with ECANCELED, bitmaps kept)."""
        with self._idle:
            for job in self._running.values():
                job.cancel(reason)

    def close(self) -> None:
        """Cancel running jobs, wait for them, persist bitmaps, release the lock."""
        if self._lock_fd < 0:
            return
        with self._idle:
            for job in self._running.values():
                job.cancel("the repository is being closed")
            while self._running:
                self._idle.wait()
        # Every device is closed, and the lock released, even when one
        # device's bitmaps cannot be saved (a full disk): the others still are.
        failed: list[BackupfsError] = []
        try:
            with self._devices_lock:
                for dev in self._devices.values():
                    try:
                        dev.close()
                    except BackupfsError as e:
                        failed.append(e)
                self._devices.clear()
        finally:
            self.catalog.close()
            os.close(self._lock_fd)
            self._lock_fd = -1
        if failed:
            raise failed[0] if len(failed) == 1 else BackupfsError("; ".join(map(str, failed)))

    # -- remotes (engine/remote/) --------------------------------------------------------

    def add_remote(self, spec: RemoteSpec) -> None:
        """Record an off-site copy's place (never its credentials)."""
        self._require_room("a remote")
        self.catalog.add_remote(spec)

    def remove_remote(self, name: str) -> bool:
        """Forget a remote; what it holds stays in its bucket."""
        self._require_room("a remote's removal")
        return self.catalog.remove_remote(name)

    def remotes(self) -> list[RemoteSpec]:
        return self.catalog.remotes()

    @staticmethod
    def push(path: str, name: str, devices: list[str] | None = None,
             on_progress: Callable[[Progress], None] | None = None) -> PushResult:
        """Send remote ``name`` what it lacks (engine/remote/push.py), reading the
        repository at ``path`` beside whoever owns it, never taking its lock: a
        push of terabytes takes hours, and backups (mounted or not) go on
        meanwhile; engine/remote/localread.py's checks keep what it sends right."""
        from engine.beside import read_catalog
        from engine.remote.push import push

        path = os.path.abspath(path)
        Repository.check_exists(path)
        catalog = read_catalog(path)
        try:
            return push(path, catalog, remote_named(catalog, name), devices, on_progress)
        finally:
            catalog.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices ---------------------------------------------------------------------

    def add_device(self, name: str, source: str, granularity: int | None = None, *, raw: bool = False,
                   compress: str | None = None, ceph_conf: str | None = None,
                   ceph_id: str | None = None) -> DeviceRecord:
        """Register a device, or give an imported archive (no source yet) its live source.

        ``granularity`` None: the default for a new device, the archive's own
        for an attach. ``raw``: take a source that holds an image format as
        the bytes to back up (engine/imageformat.py). ``compress`` ("none" or
        "zstd"): how its backups store clusters unless a backup says
        otherwise; None: "none" (an attach keeps the device's).
        """
        self._require_room("adding a device")
        validate_name(name)
        if compress is not None:
            validate_compress(compress)
        existing = self.catalog.device(name)
        if existing is not None and existing.source:
            raise UsageError(f"device {name!r} already exists (its source is {existing.source})")
        if granularity is None:
            granularity = existing.granularity if existing is not None else DEFAULT_GRANULARITY
        validate_granularity(granularity)
        source, size, identity, ceph = self._probe_any(source, raw, ceph_conf, ceph_id)
        check_granules(size, granularity, f"source {source}")
        self._check_unclaimed(source, identity)
        if existing is not None:
            rec = self._attach_source(existing, source, size, granularity, identity, ceph)
            if compress is not None and compress != rec.compress:
                rec = self.set_device(name, compress=compress)
            return rec
        make_dir(self._device_dir(name))
        fsync_dir(os.path.join(self.path, DEVICES))  # durable before the catalog names it
        return self.catalog.add_device(name, source, size, granularity, identity=identity,
                                       compress=compress or "none", ceph=ceph)

    def set_device(self, name: str, *, compress: str | None = None) -> DeviceRecord:
        """Change a device's settings: its default compression (for its next
        backups; those taken stay as they are)."""
        self._require_room("changing a device")
        if self.catalog.device(name) is None:
            raise UsageError(f"no device named {name!r}")
        if compress is not None:
            validate_compress(compress)
            self.catalog.set_compress(name, compress)
        rec = self.catalog.device(name)
        assert rec is not None
        return rec

    def _probe_any(self, source: str, raw: bool, ceph_conf: str | None, ceph_id: str | None
                   ) -> tuple[str, int, SourceId, str | None]:
        """(canonical name, size, identity, cluster settings) of a path or an rbd: image."""
        if not is_rbd(source):
            if ceph_conf is not None or ceph_id is not None:
                raise UsageError(f"--ceph-conf and --ceph-id are for rbd: sources, not {escape(source)}")
            return (*self._probe_source(source, raw), None)
        spec, size, identity = probe_rbd(source, ceph_conf, ceph_id)
        if size <= 0 or size % 512:
            raise UsageError(f"source {spec.source} is {size} bytes; a device must be a non-zero multiple of 512")
        return spec.source, size, identity, spec.options()

    def _probe_source(self, source: str, raw: bool = False) -> tuple[str, int, SourceId]:
        """(absolute path, size, identity) of a source to bind a device to
        (engine/sourcecheck.py), whose size a device can have."""
        source, size, identity = probe_source(source, self.path, raw)
        self._check_off_mount(source, identity)
        if size <= 0 or size % 512:
            raise UsageError(f"source {source} is {size} bytes; a device must be a non-zero multiple of 512")
        return source, size, identity

    def replace_source(self, name: str, source: str, raw: bool = False, ceph_conf: str | None = None,
                       ceph_id: str | None = None, notes: list[str] | None = None) -> DeviceRecord:
        """Rebind a device to ``source`` on purpose: another path, or the
        file now at its path (``mv new.img src.img``), which a device's
        every open refuses until this says it is the device's disk.

        Same size required (its backups are that size). Nothing recorded
        what the new source holds, so its bitmaps are made untrusted first,
        saved, then the catalog names the new source: the next backup scans.

        An RBD source's kept snapshot goes first: on the old image it is no
        backup's base any more, and nothing else would ever remove it (it
        holds every block the old image rewrites). What could not be
        removed (a cluster out of reach) is added to ``notes``, in words.
        """
        self._require_room("rebinding a device's source")
        validate_name(name)
        rec = self.catalog.device(name)
        if rec is None:
            raise UsageError(f"no device named {name!r}")
        if not rec.source:
            raise UsageError(f"device {name} has no live source (an imported archive); "
                             f"give it one without --replace")
        source, size, identity, ceph = self._probe_any(source, raw, ceph_conf, ceph_id)
        if size != rec.size:
            raise UsageError(f"source {source} is {size} bytes but device {name} is {rec.size}; "
                             "a device's source keeps its size")
        self._check_unclaimed(source, identity, but=name)
        with self._let_go(name):
            why = f"its source was rebound to {source} (device add --replace)"
            try:
                distrust_saved_bitmaps(self._device_dir(name), BITMAPS, why)
            except OSError as e:
                raise storage_error(e) from None
            if is_rbd(rec.source):
                said = remove_rbd_snapshots(self.catalog, rec)
                if notes is not None:
                    notes.extend(said)
                for row in self.catalog.rbd_snapshots(name):  # they name the old image's
                    self.catalog.forget_rbd_snapshot(name, row.name)
            self.catalog.set_source(name, source, identity, ceph)
        return self.catalog.device(name) or rec

    def _attach_source(self, rec: DeviceRecord, source: str, size: int, granularity: int,
                       identity: SourceId, ceph: str | None = None) -> DeviceRecord:
        """Bind an imported archive to the disk it came from, so backups go on from it.

        Nothing recorded what that disk did since the archive's last image,
        so its bitmaps start untrusted, with that reason: the next
        incremental compares checksums with the archive's and copies what
        differs.
        """
        if size != rec.size:
            raise UsageError(f"source {source} is {size} bytes but device {rec.name}'s backups are {rec.size}")
        if granularity != rec.granularity:
            raise UsageError(
                f"device {rec.name} has a granularity of {format_size(rec.granularity)} (its imported "
                f"checksums are kept at it); leave out --granularity"
            )
        self.catalog.set_source(rec.name, source, identity, ceph)
        self._distrust_new_source(rec.name)
        return self.catalog.device(rec.name) or rec

    def _distrust_new_source(self, name: str) -> None:
        """Record why a device whose history was imported starts with untrusted bitmaps.

        Saved after the catalog commit, and only for the message: no bitmap
        file (a crash in between, or a failure here) is untrusted too, with
        a vaguer reason, so a failure here does not fail what was committed.
        """
        try:
            dev = self.device(name)
            dev.distrust("its backups were imported: nothing recorded what changed on its source since")
            dev.save_bitmaps()
        except (BackupfsError, OSError):
            pass

    def _check_unclaimed(self, source: str, identity: SourceId, but: str | None = None) -> None:
        """Refuse a source another device (than ``but``) already has: under
        two names one disk is backed up twice, and writes through one name
        reach the other only as another program's, which makes it scan."""
        for d in self.catalog.devices():
            if not d.source or d.name == but:
                continue
            if is_rbd(d.source) or is_rbd(source):
                same = d.source == source or identity == d.identity
            else:
                same = os.path.abspath(d.source) == source or identity in (d.identity, identity_at(d.source))
            if same:
                raise UsageError(f"source {source} is already the source of device {d.name}")

    def import_chain(
        self, name: str, tip: str, granularity: int = DEFAULT_GRANULARITY, source: str | None = None,
        on_layer: Callable[[int, int, str], None] | None = None,
        allow_outside: Sequence[str] = (), backing_format: str | None = None, tip_format: str = "qcow2",
        raw_source: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> list[BackupRecord]:
        """Adopt a QEMU/libvirt chain as the history of a new device ``name``
        (backing files confined as engine/importer.py says)."""
        self._require_room("an import")
        validate_name(name)
        validate_granularity(granularity)
        if self.catalog.device(name) is not None:
            raise UsageError(f"device {name!r} already exists")
        if os.path.commonpath([os.path.abspath(tip), self.path]) == self.path:
            raise UsageError(f"{tip} lies inside the repository; import from outside it")
        try:
            if source is not None:
                found = identity_at(source)
                if found is not None:  # else the import names what is wrong with it
                    self._check_off_mount(source, found)
                    self._check_unclaimed(os.path.abspath(source), found)
            records = import_chain(self.path, self.catalog, name, tip, granularity, source, on_layer,
                                   allow_outside, backing_format, tip_format, raw_source=raw_source,
                                   on_progress=on_progress, forbidden_dev=self.mount_dev)
        except BaseException:
            # All or nothing: the device and its backups are committed in one
            # go, last. Not committed: no half of it stays. Committed (an
            # interrupt just after): it is whole, and it stays.
            if self.catalog.device(name) is None:
                mine = [(p, k) for p, k in self.catalog.intents()
                        if p == device_rel(name) or p.startswith(device_rel(name) + "/")]
                self._remove_recorded(mine)
            raise
        if source is not None:
            self._distrust_new_source(name)
        return records

    def _check_off_mount(self, source: str, identity: SourceId) -> None:
        """Refuse a source on this repository's own mount, by whatever path it was reached."""
        if self.mount_dev is not None and identity.kind == FILE and identity.dev == self.mount_dev:
            raise UsageError(f"source {source} lies on this repository's own backupfs mount (reached by "
                             "another path); its daemon reading it would hang the mount: give a path outside it")

    @contextmanager
    def _let_go(self, name: str) -> Iterator[None]:
        """Close device ``name`` if it is open, so that its source or its
        files can change under it; refused while a backup of it runs.

        Until the block ends ``device(name)`` refuses (EBUSY): a mounted
        repository opens devices from other threads (a `stat` of its bitmap
        file does), and one opened from the old record in between would be
        kept, bound to the source it no longer has (or to a removed device's
        source, for a device added again under its name)."""
        with self._devices_lock:
            dev = self._devices.get(name)
            if dev is not None and dev.job is not None:
                raise JobBusy(f"device {name} has a backup running")
            self._devices.pop(name, None)
            self._away.add(name)
        try:
            if dev is not None:
                dev.close()
            yield
        finally:
            with self._devices_lock:
                self._away.discard(name)

    def remove_device(self, name: str) -> list[str]:
        """Forget device ``name`` and delete its backups; what could not be
        cleaned up (an RBD snapshot on a cluster out of reach), in words."""
        self._require_room("removing a device")
        rec = self.catalog.device(name)
        if rec is None:
            raise UsageError(f"no device named {name!r}")
        notes: list[str] = []
        with self._let_go(name):
            if is_rbd(rec.source):
                notes = remove_rbd_snapshots(self.catalog, rec)
            # Only the files backupfs made: a user's file there stays (and so
            # then does the directory).
            leftovers = [(f, "file") for b in self.catalog.backups(name) for f in (b.image, b.checksums) if f]
            leftovers += [(file_rel(name, f), "file") for w in BITMAPS
                          for f in (bitmap_name(w), bitmap_tmp_name(w))]
            leftovers.append((device_rel(name), "dir"))
            self.catalog.remove_device(name, leftovers)
            self._remove_recorded(leftovers)
        return notes

    def devices(self) -> list[DeviceRecord]:
        return self.catalog.devices()

    def _device_dir(self, name: str) -> str:
        return device_dir(self.path, name)

    def device(self, name: str) -> Device:
        """The device opened for I/O (opened once, kept until close)."""
        with self._devices_lock:
            if name in self._away:
                raise DeviceError(f"device {name} is being removed or given another source; try again",
                                  errno.EBUSY)
            dev = self._devices.get(name)
            if dev is None:
                rec = self.catalog.device(name)
                if rec is None:
                    raise UsageError(f"no device named {name!r}")
                if rec.identity is not None and self.mount_dev is not None and rec.identity.kind == FILE \
                        and rec.identity.dev == self.mount_dev:
                    raise DeviceError(f"device {name}: its source {rec.source} lies on this repository's own "
                                      "mount, which cannot read itself", errno.EDEADLK)
                if not rec.source:
                    raise DeviceError(
                        f"device {name} has no live source (an imported archive); give it one "
                        f"with 'backupfs device add REPO {name} SOURCE' to take new backups",
                        errno.ENODEV,
                    )
                has_backups = self.catalog.latest_backup(name) is not None
                kind = RbdDevice if is_rbd(rec.source) else Device
                dev = kind(rec, self._device_dir(name), has_backups, peek=bool(self.catalog.frozen))
                self._devices[name] = dev
                if rec.identity is None and not self.catalog.frozen:
                    self._record_identity(dev)
            return dev

    def _record_identity(self, dev: Device) -> None:
        """A device bound before identities were kept is held, from its first
        open on, by what its path led to then. Not recorded now (the catalog
        cannot be written): the next open tries again."""
        assert dev.source_id is not None
        try:
            self.catalog.record_source_identity(dev.name, dev.source_id)
        except CatalogError:
            pass

    def open_device(self, name: str) -> Device:
        """The device, for a program opening it: a source that leads elsewhere,
        resized or gone is refused."""
        dev = self.device(name)
        with dev.gate.exclusive():
            dev.check_source()
        return dev

    # -- backups -------------------------------------------------------------------------

    def backups(self, name: str | None = None) -> list[BackupRecord]:
        return self.catalog.backups(name)

    # Single rows, for the mounted tree: a lookup asks for one name, and a
    # listing of every backup for it cost seconds at 3,000 backups.

    def device_record(self, name: str) -> DeviceRecord | None:
        """The device's catalog row, or None if there is no such device."""
        return self.catalog.device(name)

    def backup_record(self, backup_id: str) -> BackupRecord | None:
        """The backup's catalog row, or None if there is no such backup."""
        return self.catalog.backup(backup_id)

    def latest_backup(self, name: str) -> BackupRecord | None:
        """The device's newest backup, or None if it has none."""
        return self.catalog.latest_backup(name)

    def jobs(self, name: str, limit: int = 20) -> list[JobRecord]:
        """The device's last jobs, newest first, as the catalog records them."""
        return self.catalog.jobs(name, limit)

    @property
    def frozen(self) -> str | None:
        """Why the catalog takes no writes now (its disk filled), or None."""
        return self.catalog.frozen

    def image_path(self, rec: BackupRecord) -> str:
        return os.path.join(self.path, rec.image)

    def chain(self, backup_id: str) -> ChainView:
        rec = self.catalog.backup(backup_id)
        if rec is None:
            raise UsageError(f"no backup {backup_id!r}")
        return ChainView.open(self.image_path(rec), tip_format="qcow2")

    def running_job(self, name: str) -> BackupJob | None:
        with self._idle:
            return self._running.get(name)

    def lineage_records(self, rec: BackupRecord) -> Iterator[ChecksumRecord]:
        """The checksum records of a backup's lineage, oldest first, loaded one at a time.

        Lazy so that overlay() holds one record at a time, not the lineage.
        Raises ChecksumError at once when a backup has no record, and while
        iterating when a record cannot be read.
        """
        paths = []
        for b in reversed(self.catalog.lineage(rec.id)):
            if b.checksums is None:
                raise ChecksumError(f"backup {b.id} has no checksum record")
            paths.append(os.path.join(self.path, b.checksums))
        return (ChecksumRecord.load(p) for p in paths)

    def chain_hashes(self, rec: BackupRecord) -> np.ndarray:
        """Granule checksums of the device as backup ``rec`` captured it."""
        try:
            hashes, defined = overlay(self.lineage_records(rec))
            if defined.all():
                return hashes
        except ChecksumError:
            pass
        # Some layer has no checksums: read the chain itself.
        with ChainView.open(self.image_path(rec), tip_format="qcow2") as view:
            out = np.zeros(-(-view.size // rec.granularity), dtype=np.uint64)
            step = max(rec.granularity, 8 * 1024 * 1024 // rec.granularity * rec.granularity)
            for off in range(0, view.size, step):
                chunk = view.read(off, step)
                g = off // rec.granularity
                h = granule_hashes(chunk, rec.granularity)
                out[g : g + len(h)] = h
            return out

    def open_backup(self, backup_id: str) -> VerifiedView:
        """A backup for reading, checked against every checksum its lineage
        has: a backup whose record is missing leaves only what it holds
        unchecked, not the whole chain."""
        rec = self.catalog.backup(backup_id)
        if rec is None:
            raise UsageError(f"no backup {backup_id!r}")
        view = ChainView.open(self.image_path(rec), tip_format="qcow2")
        try:
            hashes, defined = overlay(self._checkable_lineage(rec))
        except BaseException:
            view.close()
            raise
        return VerifiedView(view, rec.id, rec.granularity, hashes, defined)

    def open_files(self, backup_id: str) -> GuestDisk:
        """The guest's volumes and files in a backup (SPEC §8), reading it
        through a checked view that closing the result closes."""
        view = self.open_backup(backup_id)
        # Imported here: the guest parsers (Dissect) cost every command ~60 ms
        # to import, and only the files view and its CLI read them.
        from engine.guest.guestdisk import GuestDisk

        return GuestDisk(view, on_close=view.close, name=backup_id)

    def history(self) -> History:
        """What changed between backups, and versions of a path (SPEC §9), reading
        backups through ``open_files``: the facade the CLI uses (the mount builds
        its own, sharing its open guest disks)."""
        from engine.history.history import History

        return History(self)

    def _checkable_lineage(self, rec: BackupRecord) -> Iterator[ChecksumRecord | Unrecorded]:
        """lineage_records, with what each backup without a readable record holds in its place."""
        for b in reversed(self.catalog.lineage(rec.id)):
            try:
                if b.checksums is None:
                    raise ChecksumError(f"backup {b.id} has no checksum record")
                yield ChecksumRecord.load(os.path.join(self.path, b.checksums))
            except ChecksumError:
                yield Unrecorded(held_granules(self.image_path(b), rec.size, rec.granularity))

    def resolve_backup(self, device: str, ident: str) -> BackupRecord:
        """A backup of ``device`` by id, 'latest', or a unique suffix after the
        timestamp (``0002``, ``0002-incremental``); an ambiguous one lists the candidates."""
        if self.catalog.device(device) is None:
            raise UsageError(f"no device named {device!r}")
        if ident == "latest":
            rec = self.catalog.latest_backup(device)
        else:
            rec = self.catalog.backup(ident)
            if rec is None or rec.device != device:
                found = matching_ids(ident, [b.id for b in self.catalog.backups(device)])
                if len(found) > 1:
                    raise UsageError(f"{ident!r} names more than one backup of {device}: "
                                     + ", ".join(found))
                rec = self.catalog.backup(found[0]) if found else None
        if rec is None or rec.device != device:
            raise UsageError(f"device {device} has no backup {ident!r}")
        return rec

    def restore(
        self,
        device: str,
        ident: str,
        target: str,
        *,
        force: bool = False,
        in_place: str | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RestoreResult:
        """Write backup ``ident`` of ``device`` out to ``target``, checking checksums.

        ``in_place``: the target is a file that can only be written in place
        (a device file on a backupfs mount), in the words that say what it is.
        """
        rec = self.resolve_backup(device, ident)
        over = source_named(target, self.catalog.devices())
        if over is not None and not force:
            raise UsageError(
                f"{target} is the source of device {over.name}; restoring over it needs --force "
                "(its bitmap will be untrusted and the next backup will scan)"
            )
        if in_place is not None:
            kind = check_in_place_target(target, rec.size, force, in_place)
        else:
            kind = check_target(target, rec.size, force, self.path)
        dev = self.device(over.name) if over is not None else None
        why = f"its source was overwritten by a restore of backup {rec.id}"
        if dev is not None:
            with dev.gate.exclusive():
                dev.overwritten(why)  # saved before a byte is written: a crash mid-way still scans
        result: RestoreResult | None = None
        try:
            with self.open_backup(rec.id) as view:
                result = restore_to(lambda pos, out: view.read(pos, len(out), into=out), rec.size, target,
                                    kind=kind, on_progress=on_progress, repository=self.path)
        finally:
            if dev is not None:
                with dev.gate.exclusive():
                    dev.overwritten(why)
                    if result is not None and result.identity is not None and (
                            identity_at(dev.path) == result.identity):
                        # The file the restore made replaced the source: the
                        # device is bound to it (backupfs made it, and the
                        # path leads to it), not to the file it replaced.
                        self.catalog.set_source(dev.name, dev.path, result.identity)
                        dev.rebind(result.identity)
        assert result is not None
        result.backup = rec.id
        return result

    def restore_rbd(
        self,
        device: str,
        ident: str,
        target: str,
        *,
        ceph_conf: str | None = None,
        ceph_id: str | None = None,
        force: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RestoreResult:
        """Write backup ``ident`` of ``device`` into the RBD image ``target``
        (rbd:POOL[/NAMESPACE]/IMAGE), checking checksums (engine/rbdrestore.py).

        The image a device is bound to is written only with ``force``, as a
        file source is: then its bitmaps are distrusted and its kept RBD
        snapshot removed (saved before a byte is written), so its next backup
        compares checksums; an image made anew under that name (the old one
        was gone) becomes the device's source.
        """
        from contextlib import ExitStack

        from engine.ceph import parse
        from engine.rbdimage import RbdImage
        from engine.rbdrestore import rbd_source_named, restore_to_rbd
        from engine.rbdsnaps import RbdSnapshots

        rec = self.resolve_backup(device, ident)
        spec = parse(target, ceph_conf, ceph_id)
        why = f"its source was overwritten by a restore of backup {rec.id}"
        owner: list[DeviceRecord] = []
        with ExitStack() as stack:

            def claim(image: RbdImage | None, identity: SourceId | None) -> None:
                d = rbd_source_named(spec, identity, self.catalog.devices())
                if d is None:
                    return
                if not force:
                    raise UsageError(f"{spec.source} is the source of device {d.name}; restoring over it needs "
                                     "--force (its next backup will then compare checksums)")
                stack.enter_context(self._let_go(d.name))  # not opened meanwhile, nor bound to what we write
                try:
                    distrust_saved_bitmaps(self._device_dir(d.name), BITMAPS, why)
                except OSError as e:
                    raise storage_error(e) from None
                if image is not None and identity == d.identity:
                    RbdSnapshots(self.catalog, d.name, image).tidy(None)
                owner.append(d)

            with self.open_backup(rec.id) as view:
                result = restore_to_rbd(lambda pos, out: view.read(pos, len(out), into=out), rec.size, spec,
                                        force=force, on_progress=on_progress, claim=claim)
            if owner and result.identity is not None:
                # The device's image was missing and the restore made it: it is
                # the device's source now (its old one is gone for good).
                d = owner[0]
                self.catalog.set_source(d.name, d.source, result.identity, d.ceph)
        result.backup = rec.id
        return result

    def prune(
        self,
        device: str,
        policy: RetentionPolicy | None = None,
        remove: str | None = None,
        *,
        dry_run: bool = False,
        hook: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> list[RemovalPlan]:
        """Remove backups by retention policy or by id, merging each into its children.

        ``on_progress`` sees each merge's copy, its phase naming the removal
        ("1 of 3: merging 0001-full into 0002-incremental")."""
        if not dry_run:
            self._require_room("pruning")
        if self.catalog.device(device) is None:
            raise UsageError(f"no device named {device!r}")
        if (policy is None or policy.empty()) == (remove is None):
            raise UsageError("give either a retention rule or --remove ID")
        with self._idle:
            if device in self._running:
                raise JobBusy(f"a backup of {device} is running; prune when it is done")
            if device in self._maintenance:
                raise JobBusy(f"backups of {device} are already being pruned")
            self._maintenance.add(device)
        try:
            if remove is not None:
                candidates = [self.resolve_backup(device, remove)]
            else:
                assert policy is not None
                candidates = select_for_removal(self.catalog.backups(device), policy)
            plans: list[RemovalPlan] = []
            for x in candidates:
                if cancel is not None and cancel.is_set() and not dry_run:
                    # Between removals: each one is whole (or finished at the next open).
                    done = ", ".join(p.removed.id for p in plans) or "nothing"
                    err = cancelled(cancel, "prune")
                    stopped = JobCancelled(f"{err}; removed before that: {done}", err.interrupted)
                    stopped.removed = plans
                    raise stopped
                x = self.catalog.backup(x.id) or x  # parents change as earlier ones go
                plan = RemovalPlan(x, self.catalog.children(x.id))
                if not dry_run:
                    self._remove_one(device, plan, hook,
                                     on_progress=_phased(on_progress, f"{len(plans) + 1} of {len(candidates)}"))
                plans.append(plan)
            return plans
        finally:
            with self._idle:
                self._maintenance.discard(device)

    def prune_preview(self, device: str, policy: RetentionPolicy | None = None,
                      remove: str | None = None) -> PrunePreview:
        """What ``prune`` would keep (and why) and remove; reads the catalog only."""
        if self.catalog.device(device) is None:
            raise UsageError(f"no device named {device!r}")
        if (policy is None or policy.empty()) == (remove is None):
            raise UsageError("give either a retention rule or --remove ID")
        backups = self.catalog.backups(device)
        if remove is not None:
            gone = self.resolve_backup(device, remove).id
            reasons = {b.id: ["not named by remove"] for b in backups if b.id != gone}
        else:
            assert policy is not None
            reasons = keep_reasons(backups, policy)
        return PrunePreview(
            keep=[(b, reasons[b.id]) for b in backups if b.id in reasons],
            remove=[RemovalPlan(b, self.catalog.children(b.id)) for b in backups if b.id not in reasons],
        )

    def _remove_one(self, device: str, plan: RemovalPlan, hook: Callable[[str], None] | None,
                    verified: bool = True, on_progress: Callable[[Progress, str], None] | None = None) -> None:
        """Remove one backup; ``verified``: the merge reads through checksums
        (not when finishing an interrupted removal at open, which must not
        leave the repository unopenable: verify then names any damage)."""
        x = plan.removed
        was_latest = (latest := self.catalog.latest_backup(device)) is not None and latest.id == x.id
        was_last_full = (full := self.catalog.last_full(device)) is not None and full.id == x.id
        x_defined = None
        if was_latest and x.checksums:
            x_defined = ChecksumRecord.load(os.path.join(self.path, x.checksums)).defined
        dev: Device | None = None
        if was_latest or (was_last_full and not plan.children):
            try:
                dev = self.device(device)
            except BackupfsError:
                # The source is away (or there is none): its saved bitmaps
                # must still not outlive x trusted, or the next backup once
                # it is back would miss x's changes. Unsaved: remove nothing.
                which = (("since-last",) if was_latest else ()) + (
                    ("since-full",) if was_last_full and not plan.children else ())
                why = ("the last full backup was removed" if "since-full" in which
                       else "the latest backup was removed")
                try:
                    distrust_saved_bitmaps(self._device_dir(device), which, why)
                except OSError as e:
                    raise storage_error(e) from None
        if dev is not None:
            # Before the removal, and saved: see Device.forget_backup. (If
            # the removal then fails, the next incremental copies a little
            # more than it needed to: still right.)
            dev.forget_backup(was_latest, was_last_full and not plan.children, x_defined)
        def content(child: BackupRecord) -> VerifiedView | ChainView:
            if not verified:
                return ChainView.open(self.image_path(child), tip_format="qcow2")
            return self.open_backup(child.id)

        remove_backup(
            self.path, x, plan.children,
            lambda: self.catalog.begin_removal(x.id),
            lambda updates, leftovers: self.catalog.apply_removal(x.id, updates, leftovers),
            open_content=content,
            hook=hook,
            intend=lambda paths: self.catalog.record_intents("file", paths),
            settled=self.forget_intents,
            on_progress=on_progress,
        )

    def verify(
        self,
        device: str | None = None,
        backup_id: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> VerifyReport:
        """Check structure, links and stored data of the chosen backups.

        One backup is checked with the backups it reads through: whether it
        can be restored is what its verify must say.
        """
        if backup_id is not None:
            rec = self.catalog.backup(backup_id)
            if device is not None and (rec is None or rec.device != device):
                rec = self.resolve_backup(device, backup_id)  # latest, or a suffix (0002)
            if rec is None or (device is not None and rec.device != device):
                raise UsageError(f"no backup {backup_id!r}" + (f" of device {device}" if device else ""))
            try:
                targets = list(reversed(self.catalog.lineage(rec.id)))
            except CatalogError:
                targets = [rec]  # a broken lineage: its check says so
        else:
            if device is not None and self.catalog.device(device) is None:
                raise UsageError(f"no device named {device!r}")
            targets = self.catalog.backups(device)
        report = VerifyReport()
        for rec in targets:
            if cancel is not None and cancel.is_set():
                raise cancelled(cancel, "verify")
            parent = self.catalog.backup(rec.parent) if rec.parent else None
            verify_backup(self.path, rec, parent, lambda r=rec: self.lineage_records(r), report, on_bytes, cancel)
        # A backup reads through its parents: one with a damaged parent
        # cannot be restored either, however sound its own image is.
        bad = {p.backup for p in report.problems if p.harms_reads}
        for rec in targets:
            if rec.id not in bad:
                try:
                    damaged = [b.id for b in self.catalog.lineage(rec.id)[1:] if b.id in bad]
                except CatalogError:
                    continue  # already reported: its parent is missing from the catalog
                if damaged:
                    report.problems.append(Problem(rec.id, f"reads through damaged backup {damaged[0]}",
                                                   inherited=True))
        self._keep_verdicts(targets, report)
        return report

    def _keep_verdicts(self, targets: list[BackupRecord], report: VerifyReport) -> None:
        """Record what verify found of each backup it checked (an incremental
        onto a bad one is then refused: engine/damage.py), and add to the
        report what to do about the damage it found."""
        own: dict[str, str] = {}
        for p in report.problems:
            if p.harms_reads and not p.inherited:
                own.setdefault(p.backup, p.what + (f" at offset {p.offset}" if p.offset is not None else ""))
        try:
            self.catalog.record_verdicts({rec.id: own.get(rec.id) for rec in targets})
        except CatalogError as e:
            # A full disk: the verdicts wait for the next verify; the report stands.
            report.advice.append(f"note: the verdicts could not be recorded in the catalog ({e})")
        unreadable = {p.backup for p in report.problems if p.harms_reads}
        checked = {rec.id for rec in targets}
        if report.problems and not unreadable:
            report.advice.append("what to do: nothing: every backup reads right; leaked clusters only waste "
                                 "space, and go when those backups are pruned")
        for device in sorted({rec.device for rec in targets if rec.id in unreadable}):
            backups = self.catalog.backups(device)
            try:  # the next incremental builds on the latest: does it read through the damage?
                on_damage = bool(backups) and any(b.id in unreadable
                                                  for b in self.catalog.lineage(backups[-1].id))
            except CatalogError:
                on_damage = True
            report.advice += damage_advice(self.path, device, backups, unreadable, checked, on_damage)

    def backup(
        self,
        name: str,
        kind: str,
        *,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        scan: bool = False,
        label: str | None = None,
        auto_full: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
        source_factory: Callable[[Device], Source] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        rate: int | None = None,
        force: bool = False,
        allow_empty: bool = False,
        compress: str | None = None,
    ) -> BackupResult:
        """Run one backup to completion (in this thread) and return what it made.

        ``force``: try a full even when it may not fit the repository's disk.
        An incremental or differential that finds nothing changed since its
        parent makes no image (``result.unchanged``, ``result.record`` the
        parent) unless ``allow_empty``: then an empty layer marks the time.
        ``compress`` ("none" or "zstd"): how the new image stores clusters;
        None: the device's default (``device add/set --compress``).
        """
        self._require_room("a backup")
        if label is not None:
            validate_label(label)  # before any copying: the same rule as the trigger's
        if kind not in KINDS:
            raise UsageError(f"unknown backup kind {kind!r} (use {', '.join(KINDS)})")
        validate_cluster_size(cluster_size)
        check_rate(rate)
        if compress is not None:
            validate_compress(compress)
        dev = self.device(name)
        if compress is None:
            rec = self.catalog.device(name)
            compress = rec.compress if rec is not None else "none"
        return BackupRun(
            self, dev, kind, cluster_size=cluster_size, scan=scan, label=label, auto_full=auto_full,
            on_progress=on_progress, cancel=cancel, source_factory=source_factory, chunk_bytes=chunk_bytes,
            rate=rate, force=force, allow_empty=allow_empty, compress=compress,
        ).run()

    # -- what a backup run (engine/backuprun.py) asks of its repository ---------------

    def pruning(self, name: str) -> bool:
        """Whether backups of ``name`` are being pruned (a backup must wait)."""
        with self._idle:
            return name in self._maintenance

    def job_begins(self, name: str, job: BackupJob) -> None:
        """Register ``name``'s running job: close() cancels it and waits for it."""
        with self._idle:
            self._running[name] = job

    def job_ends(self, name: str) -> None:
        """Forget ``name``'s job (if any), and wake close() waiting for the last."""
        with self._idle:
            self._running.pop(name, None)
            self._idle.notify_all()


def _phased(on_progress: Callable[[Progress], None] | None, which: str
            ) -> Callable[[Progress, str], None] | None:
    """A merge's progress for ``on_progress``: its phase says ``which`` of the
    removals it is, then the merge (as remove_backup names it)."""
    if on_progress is None:
        return None
    report = on_progress

    def show(p: Progress, what: str) -> None:
        report(Progress(total=p.total, done=p.done, written=p.written, started=p.started,
                        phase=f"{which}: {what}"))
    return show


def _check_real_dirs(path: str, devices: list[str]) -> None:
    """Refuse a repository whose devices/ or a device's directory is a
    symlink: backupfs would write images, bitmaps and checksums (and remove
    them) wherever it points. Missing ones are made again by recovery."""
    for rel in [DEVICES] + [device_rel(name) for name in devices]:
        where = os.path.join(path, rel)
        if os.path.islink(where):
            raise RepositoryError(f"{where} is a symlink; backupfs keeps its files only in real directories "
                                  "of the repository (remove the link, or put the directory back)", errno.ELOOP)
        if os.path.lexists(where) and not os.path.isdir(where):
            raise RepositoryError(f"{where} is not a directory", errno.ENOTDIR)


__all__ = ["Repository", "RepositoryError", "JobBusy", "BackupResult", "DeviceError", "KINDS"]
