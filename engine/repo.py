"""The repository: the one facade the CLI and the filesystem call.

Layout of a repository directory::

    catalog.db              SQLite catalog (devices, backups, jobs)
    lock                    fcntl lock, holds the owner's pid
    devices/<name>/
        <id>.qcow2          one image per backup; backing file = parent's image
        <id>.sums           per-granule checksums of what the backup captured
        since-last.bitmap   dirty since the previous backup
        since-full.bitmap   dirty since the last full
        .tmp-<id>.qcow2     a job's image until it is complete (removed at open)

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
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine import durable
from engine.access import Access, make_dir, notices, secure
from engine.bitmap import validate_granularity
from engine.catalog import DISK_FULL, KINDS, BackupRecord, Catalog, CatalogError, DeviceRecord, JobRecord
from engine.chain import ChainView
from engine.checksums import ChecksumError, ChecksumRecord, Unrecorded, granule_hashes, overlay
from engine.device import Device, DeviceError, distrust_saved_bitmaps
from engine.errors import BackupfsError, ImageError, UsageError
from engine.fsutil import file_size, fsync_dir
from engine.limits import check_granules
from engine.integrity import Problem, VerifiedView, VerifyReport, held_granules, verify_backup
from engine.stopsignals import STOP_SIGNALS
from engine.units import format_size
from engine.restore import RestoreResult, check_in_place_target, check_target, restore_to, source_named
from engine.sourceid import PathRefused, SourceId, identity_at, open_disk
from engine.importer import import_chain
from engine.prune import RemovalPlan, RetentionPolicy, remove_backup, select_for_removal
from engine.job import (
    CHUNK_BYTES,
    BackupJob,
    JobCancelled,
    JobError,
    JobPlan,
    Progress,
    Source,
    cancelled,
    copy_cluster_size,
    units_of,
)
from engine.qcow2.format import MAX_CHAIN_DEPTH
from engine.qcow2.writer import Qcow2Writer, validate_cluster_size
from engine.validate import NAME_RE, utf8_path, validate_label

DEFAULT_CLUSTER_SIZE = 64 * 1024
DEFAULT_GRANULARITY = 64 * 1024
CATALOG = "catalog.db"


class RepositoryError(BackupfsError):
    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class JobBusy(RepositoryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EBUSY)


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):  # match() with $ lets a trailing newline through
        raise UsageError(
            f"invalid device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


@dataclass
class BackupResult:
    record: BackupRecord
    scanned: bool
    bytes_total: int
    bytes_written: int
    cbw_units: int
    seconds: float
    scan_reason: str | None = None

    def summary(self) -> str:
        how = f"scanned ({self.scan_reason}), " if self.scanned else ""
        return (
            f"{self.record.id}: {self.record.kind}, {how}"
            f"{self.bytes_written} bytes stored of {self.bytes_total} examined in {self.seconds:.2f} s"
        )


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
            make_dir(os.path.join(path, "devices"), access)
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
                os.rmdir(os.path.join(path, "devices"))
                if made_dir:
                    os.rmdir(path)
            except OSError:
                pass
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise RepositoryError(f"cannot create a repository in {path}: {reason}", errno.EIO) from None

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
        lock_path = os.path.join(path, "lock")
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
        devroot = os.path.join(self.path, "devices")
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
            for which in ("since-last", "since-full"):
                self._remove_file(f"devices/{d.name}/{which}.bitmap.tmp")
        for backup_id in self.catalog.pending_removals():
            rec = self.catalog.backup(backup_id)
            if rec is not None:
                # An interrupted prune: finish it (see engine/prune.py).
                self._remove_one(rec.device, RemovalPlan(rec, self.catalog.children(rec.id)), None,
                                 verified=False)

    def _relative(self, path: str) -> str:
        """A path in the repository as the catalog records it (devices/NAME/FILE)."""
        return os.path.relpath(path, self.path)

    def _forget_intents(self, paths: list[str]) -> None:
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
            root = os.open(os.path.join(self.path, "devices"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
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
        if len(parts) != 3 or parts[0] != "devices" or not NAME_RE.fullmatch(parts[1]) \
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
        if len(parts) != 2 or parts[0] != "devices" or not NAME_RE.fullmatch(parts[1]):
            return
        if self.catalog.device(parts[1]) is not None:
            return
        try:
            root = os.open(os.path.join(self.path, "devices"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
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

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices ---------------------------------------------------------------------

    def add_device(self, name: str, source: str, granularity: int | None = None) -> DeviceRecord:
        """Register a device, or give an imported archive (no source yet) its live source.

        ``granularity`` None: the default for a new device, the archive's own
        for an attach.
        """
        self._require_room("adding a device")
        validate_name(name)
        existing = self.catalog.device(name)
        if existing is not None and existing.source:
            raise UsageError(f"device {name!r} already exists (its source is {existing.source})")
        if granularity is None:
            granularity = existing.granularity if existing is not None else DEFAULT_GRANULARITY
        validate_granularity(granularity)
        source, size, identity = self._probe_source(source)
        check_granules(size, granularity, f"source {source}")
        self._check_unclaimed(source, identity)
        if existing is not None:
            return self._attach_source(existing, source, size, granularity, identity)
        make_dir(self._device_dir(name))
        fsync_dir(os.path.join(self.path, "devices"))  # durable before the catalog names it
        return self.catalog.add_device(name, source, size, granularity, identity=identity)

    def _probe_source(self, source: str) -> tuple[str, int, SourceId]:
        """(absolute path, size, identity) of a source to bind a device to,
        refused unless it is a regular file or block device outside the
        repository, reached without an untrusted symlink (engine/sourceid.py)."""
        source = utf8_path(os.path.abspath(source), "source")
        if os.path.commonpath([source, self.path]) == self.path:
            raise UsageError(f"source {source} lies inside the repository {self.path}")
        try:
            fd, identity = open_disk(source, os.O_RDONLY)
        except PathRefused as e:
            if e.link:
                raise UsageError(f"source {source} is {e.found}; give the path of the file or device "
                                 "itself") from None
            raise UsageError(f"source {source} is not a regular file or block device: it is {e.found}") from None
        except OSError as e:
            raise UsageError(f"source {source}: {e.strerror}") from None
        try:
            size = file_size(fd)
            real = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else source
        finally:
            os.close(fd)
        if os.path.commonpath([real, os.path.realpath(self.path)]) == os.path.realpath(self.path):
            raise UsageError(f"source {source} leads to {real}, inside the repository {self.path}")
        if size <= 0 or size % 512:
            raise UsageError(f"source {source} is {size} bytes; a device must be a non-zero multiple of 512")
        return source, size, identity

    def replace_source(self, name: str, source: str) -> DeviceRecord:
        """Rebind a device to ``source`` on purpose: another path, or the
        file now at its path (``mv new.img src.img``), which a device's
        every open refuses until this says it is the device's disk.

        Same size required (its backups are that size). Nothing recorded
        what the new source holds, so its bitmaps are made untrusted first,
        saved, then the catalog names the new source: the next backup scans.
        """
        self._require_room("rebinding a device's source")
        validate_name(name)
        rec = self.catalog.device(name)
        if rec is None:
            raise UsageError(f"no device named {name!r}")
        if not rec.source:
            raise UsageError(f"device {name} has no live source (an imported archive); "
                             f"give it one without --replace")
        source, size, identity = self._probe_source(source)
        if size != rec.size:
            raise UsageError(f"source {source} is {size} bytes but device {name} is {rec.size}; "
                             "a device's source keeps its size")
        self._check_unclaimed(source, identity, but=name)
        with self._devices_lock:
            dev = self._devices.get(name)
            if dev is not None and dev.job is not None:
                raise JobBusy(f"device {name} has a backup running")
            self._devices.pop(name, None)
        if dev is not None:
            dev.close()
        why = f"its source was rebound to {source} (device add --replace)"
        try:
            distrust_saved_bitmaps(self._device_dir(name), ("since-last", "since-full"), why)
        except OSError as e:
            raise _storage_error(e) from None
        self.catalog.set_source(name, source, identity)
        return self.catalog.device(name) or rec

    def _attach_source(self, rec: DeviceRecord, source: str, size: int, granularity: int,
                       identity: SourceId) -> DeviceRecord:
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
        self.catalog.set_source(rec.name, source, identity)
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
            same = os.path.abspath(d.source) == source or identity in (d.identity, identity_at(d.source))
            if same:
                raise UsageError(f"source {source} is already the source of device {d.name}")

    def import_chain(
        self, name: str, tip: str, granularity: int = DEFAULT_GRANULARITY, source: str | None = None,
        on_layer: Callable[[int, int, str], None] | None = None,
        allow_outside: Sequence[str] = (), backing_format: str | None = None,
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
                    self._check_unclaimed(os.path.abspath(source), found)
            records = import_chain(self.path, self.catalog, name, tip, granularity, source, on_layer,
                                   allow_outside, backing_format)
        except BaseException:
            # All or nothing: the device and its backups are committed in one
            # go, last. Not committed: no half of it stays. Committed (an
            # interrupt just after): it is whole, and it stays.
            if self.catalog.device(name) is None:
                mine = [(p, k) for p, k in self.catalog.intents()
                        if p == f"devices/{name}" or p.startswith(f"devices/{name}/")]
                self._remove_recorded(mine)
            raise
        if source is not None:
            self._distrust_new_source(name)
        return records

    def remove_device(self, name: str) -> None:
        self._require_room("removing a device")
        if self.catalog.device(name) is None:
            raise UsageError(f"no device named {name!r}")
        with self._devices_lock:
            dev = self._devices.get(name)
            if dev is not None and dev.job is not None:
                raise JobBusy(f"device {name} has a backup running")
            self._devices.pop(name, None)
        if dev is not None:
            dev.close()
        # Only the files backupfs made: a user's file there stays (and so
        # then does the directory).
        leftovers = [(f, "file") for b in self.catalog.backups(name) for f in (b.image, b.checksums) if f]
        leftovers += [(f"devices/{name}/{w}.bitmap{t}", "file") for w in ("since-last", "since-full")
                      for t in ("", ".tmp")]
        leftovers.append((f"devices/{name}", "dir"))
        self.catalog.remove_device(name, leftovers)
        self._remove_recorded(leftovers)

    def devices(self) -> list[DeviceRecord]:
        return self.catalog.devices()

    def _device_dir(self, name: str) -> str:
        return os.path.join(self.path, "devices", name)

    def device(self, name: str) -> Device:
        """The device opened for I/O (opened once, kept until close)."""
        with self._devices_lock:
            dev = self._devices.get(name)
            if dev is None:
                rec = self.catalog.device(name)
                if rec is None:
                    raise UsageError(f"no device named {name!r}")
                if not rec.source:
                    raise DeviceError(
                        f"device {name} has no live source (an imported archive); give it one "
                        f"with 'backupfs device add REPO {name} SOURCE' to take new backups",
                        errno.ENODEV,
                    )
                has_backups = self.catalog.latest_backup(name) is not None
                dev = Device(rec, self._device_dir(name), has_backups, peek=bool(self.catalog.frozen))
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
        return ChainView.open(self.image_path(rec))

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
        with ChainView.open(self.image_path(rec)) as view:
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
        view = ChainView.open(self.image_path(rec))
        try:
            hashes, defined = overlay(self._checkable_lineage(rec))
        except BaseException:
            view.close()
            raise
        return VerifiedView(view, rec.id, rec.granularity, hashes, defined)

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
        """A backup of ``device`` by id, or 'latest'."""
        if self.catalog.device(device) is None:
            raise UsageError(f"no device named {device!r}")
        rec = self.catalog.latest_backup(device) if ident == "latest" else self.catalog.backup(ident)
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

    def prune(
        self,
        device: str,
        policy: RetentionPolicy | None = None,
        remove: str | None = None,
        *,
        dry_run: bool = False,
        hook: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[RemovalPlan]:
        """Remove backups by retention policy or by id, merging each into its children."""
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
                    self._remove_one(device, plan, hook)
                plans.append(plan)
            return plans
        finally:
            with self._idle:
                self._maintenance.discard(device)

    def _remove_one(self, device: str, plan: RemovalPlan, hook: Callable[[str], None] | None,
                    verified: bool = True) -> None:
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
                    raise _storage_error(e) from None
        if dev is not None:
            # Before the removal, and saved: once the catalog forgets x, an
            # interruption must not leave a bitmap that forgot x's changes.
            # (If the removal then fails, the next incremental copies a
            # little more than it needed to: still right.)
            with dev.gate.exclusive():
                if was_latest:
                    # The next incremental backs onto x's parent: it must copy x's changes too.
                    if x_defined is not None:
                        dev.since_last.active.bits |= x_defined
                    else:
                        dev.since_last.trusted = False
                        dev.untrusted_reason = "the latest backup was removed"
                if was_last_full and not plan.children:
                    dev.since_full.trusted = False
                    dev.untrusted_reason = "the last full backup was removed"
                dev.save_bitmaps()
        def content(child: BackupRecord) -> VerifiedView | ChainView:
            if not verified:
                return ChainView.open(self.image_path(child))
            return self.open_backup(child.id)

        remove_backup(
            self.path, x, plan.children,
            lambda: self.catalog.begin_removal(x.id),
            lambda updates, leftovers: self.catalog.apply_removal(x.id, updates, leftovers),
            open_content=content,
            hook=hook,
            intend=lambda paths: self.catalog.record_intents("file", paths),
            settled=self._forget_intents,
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
                    report.problems.append(Problem(rec.id, f"reads through damaged backup {damaged[0]}"))
        return report

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
    ) -> BackupResult:
        """Run one backup to completion (in this thread) and return what it made."""
        self._require_room("a backup")
        if label is not None:
            validate_label(label)  # before any copying: the same rule as the trigger's
        if kind not in KINDS:
            raise UsageError(f"unknown backup kind {kind!r} (use {', '.join(KINDS)})")
        validate_cluster_size(cluster_size)
        dev = self.device(name)
        started = time.monotonic()
        created_ns = time.time_ns()

        with dev.gate.exclusive():
            with self._idle:
                if name in self._maintenance:
                    raise JobBusy(f"backups of {name} are being pruned; try again when that is done")
            if dev.job is not None:
                p = dev.job.progress
                raise JobBusy(
                    f"a backup of {name} is already running: {p.done} of {p.total} bytes done "
                    f"({100 * p.fraction():.0f}%)"
                )
            dev.check_source()  # replaced: follow it (and scan); resized or gone: refuse
            distrusts = dev.distrust_count  # one while the job runs: the next backup scans
            parent = self._parent_for(name, kind)
            if parent is None and kind != "full":
                if not auto_full:
                    raise UsageError(f"device {name} has no full backup yet; take a full backup first "
                                     "(or ask for auto_full=1 in the trigger, --auto-full to 'backupfs backup')")
                kind = "full"
            depth = len(self.catalog.lineage(parent.id)) + 1 if parent is not None and kind != "full" else 1
            if depth > MAX_CHAIN_DEPTH:
                # The new image could not be read back: no reader (ours,
                # following QEMU's backing links) goes deeper.
                if not auto_full:
                    raise UsageError(
                        f"device {name}: a new {kind} would be backup {depth} of its chain, and a chain reads "
                        f"through at most {MAX_CHAIN_DEPTH} images; take a full backup (or ask for auto_full=1 "
                        "in the trigger, --auto-full to 'backupfs backup'), or prune old backups, which "
                        "merges them"
                    )
                kind, parent = "full", None
            tracked = dev.since_full if kind == "differential" else dev.since_last
            scan_reason = None
            if kind != "full":
                if scan:
                    scan_reason = "requested"
                elif not tracked.trusted:
                    scan_reason = f"bitmap untrusted: {dev.untrusted_reason or 'unknown'}"
            plan_scan = scan_reason is not None
            parent_hashes = self.chain_hashes(parent) if plan_scan and parent else None

            unit = copy_cluster_size(dev.granularity, cluster_size)
            # Freeze the bitmaps this kind consumes; a differential reads
            # since_full without consuming it (the next differential needs it).
            writer: Qcow2Writer | None = None
            tmp = ""
            intents: list[str] = []
            held: set[signal.Signals] | None = None
            try:
                frozen_last = dev.since_last.freeze()
                frozen_full = dev.since_full.freeze() if kind == "full" else None
                if kind == "full" or plan_scan:
                    units = units_of([(0, dev.size)], unit, dev.size)
                elif kind == "incremental":
                    units = units_of(frozen_last.runs(), unit, dev.size)
                else:
                    units = units_of(dev.since_full.active.runs(), unit, dev.size)

                seq = self.catalog.next_seq()
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created_ns / 1e9))
                backup_id = f"{stamp}-{seq:04d}-{kind}"
                ddir = self._device_dir(name)
                final = os.path.join(ddir, f"{backup_id}.qcow2")
                tmp = os.path.join(ddir, f".tmp-{backup_id}.qcow2")
                sums_path = os.path.join(ddir, f"{backup_id}.sums")
                # Recorded before they exist: after a crash, recovery removes these (and only these).
                intents = [self._relative(p) for p in (tmp, final, sums_path)]
                self.catalog.record_intents("file", intents)
                writer = Qcow2Writer(
                    tmp,
                    dev.size,
                    cluster_size,
                    backing_file=f"{parent.id}.qcow2" if parent else None,
                    backing_format="qcow2" if parent else None,
                )
                plan = JobPlan(dev.size, dev.granularity, cluster_size, units, kind != "full", parent_hashes)
                checksums = ChecksumRecord(dev.size, dev.granularity)
                source = source_factory(dev) if source_factory else Source(dev.fd, dev.path, dev.size)
                job = BackupJob(
                    plan, source, writer, checksums, kind=kind, on_progress=on_progress, cancel=cancel,
                    chunk_bytes=chunk_bytes, rate=rate,
                )
                # From registering the job to inside the try that undoes it,
                # a stop signal (whose handler raises: Ctrl-C, a CLI's
                # SIGTERM) is held back: raised in between (leaving the
                # gate, say), it left the job registered and close() waiting
                # for it forever.
                held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                dev.job = job
                with self._idle:
                    self._running[name] = job
            except BaseException:
                # Anything (a Ctrl-C included) before the job is under way:
                # undo all of it, or close() would wait for it forever.
                dev.job = None
                with self._idle:
                    self._running.pop(name, None)
                    self._idle.notify_all()
                if writer is not None:
                    writer.abort()
                if tmp:
                    try:
                        durable.fs.unlink(tmp)
                    except FileNotFoundError:
                        pass
                self._forget_intents(intents)
                if dev.since_last.frozen is not None:
                    dev.since_last.reclaim()
                if kind == "full" and dev.since_full.frozen is not None:
                    dev.since_full.reclaim()
                if held is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)
                raise
        ok = False
        failure: BaseException | None = None
        job_id: int | None = None
        try:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop held back lands here
                job_id = self.catalog.job_started(name, kind)  # inside: a failure here must undo the above
                job.run()
                writer.commit()
                # Written in place (not renamed): until the catalog names it,
                # a crash leaves an orphan that the next open removes. One
                # directory fsync then covers it and the image's rename.
                checksums.save(sums_path, atomic=False)
                durable.fs.replace(tmp, final)
                fsync_dir(ddir)
            except OSError as e:
                raise _storage_error(e) from None
            except ImageError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise RepositoryError(f"repository disk full: {e}", errno.ENOSPC) from None
                raise
            rec = BackupRecord(
                id=backup_id,
                device=name,
                seq=seq,
                kind=kind,
                parent=parent.id if parent else None,
                created_ns=created_ns,
                size=dev.size,
                cluster_size=cluster_size,
                granularity=dev.granularity,
                image=f"devices/{name}/{backup_id}.qcow2",
                checksums=f"devices/{name}/{backup_id}.sums",
                stored_bytes=writer.stored_bytes(),
                label=label,
                scanned=plan_scan,
            )
            finished = dict(backup=backup_id, total=job.progress.total, done=job.progress.done,
                            written=job.progress.written, scanned=plan_scan)
            assert job_id is not None
            self.catalog.add_backup(rec, job=(job_id, finished))  # the instant it becomes visible
            ok = True
        except BaseException as e:
            failure = e
            raise
        finally:
            try:
                committed = ok
                if not ok and failure is not None:
                    # Interrupted (Ctrl-C) after the catalog commit returned:
                    # the backup is there, whole; its files must stay.
                    committed = self._committed(backup_id)
                # Exclusive: waits for writes in flight, whose copy-before-write
                # may still be writing into the image; none starts after this.
                with dev.gate.exclusive():
                    dev.job = None
                    if committed:
                        # Trusted again, unless something the bitmap cannot
                        # have seen happened while the job ran.
                        resynced = dev.distrust_count == distrusts
                        dev.since_last.abdicate()
                        dev.since_last.trusted = resynced
                        if frozen_full is not None:
                            dev.since_full.abdicate()
                            dev.since_full.trusted = resynced
                        elif plan_scan and not dev.since_full.trusted and resynced:
                            self._rebuild_since_full(dev, rec)
                    else:
                        dev.since_last.reclaim()
                        if frozen_full is not None:
                            dev.since_full.reclaim()
                if committed:
                    self._forget_intents(intents)
                else:
                    # Only now: closed earlier, the image's descriptor could be
                    # reused by another file while a copy-before-write still
                    # held its number.
                    writer.abort()
                    # Unsure whether the catalog names them: leave them to the
                    # next open, which removes the recorded files the catalog does not name.
                    doubt = committed is None
                    for leftover in (tmp,) if doubt else (tmp, final, sums_path):
                        try:
                            durable.fs.unlink(leftover)
                        except FileNotFoundError:
                            pass
                    if not doubt:
                        self._forget_intents(intents)
                    cancelled = isinstance(failure, KeyboardInterrupt) or (
                        isinstance(failure, JobError) and failure.errno == errno.ECANCELED)
                    try:
                        if job_id is not None:
                            self.catalog.job_finished(
                                job_id, "cancelled" if cancelled else "failed", total=job.progress.total,
                                done=job.progress.done, written=job.progress.written, scanned=plan_scan,
                                error=_failure_text(failure),
                            )
                    except CatalogError:
                        pass  # history only (a full disk): the error that stopped the job matters
            finally:
                with self._idle:
                    self._running.pop(name, None)
                    self._idle.notify_all()
        return BackupResult(
            rec, plan_scan, job.progress.total, job.progress.written, job.cbw_units,
            time.monotonic() - started, scan_reason,
        )

    def _committed(self, backup_id: str) -> bool | None:
        """Whether the catalog names the backup (None: it cannot say)."""
        try:
            return self.catalog.backup(backup_id) is not None
        except Exception:  # noqa: BLE001 - any doubt keeps the files
            return None

    def _rebuild_since_full(self, dev: Device, newest: BackupRecord) -> None:
        """Make since_full trustworthy again after a checksum scan.

        What changed since the last full is what the backups after it
        defined (each copied at least the granules that differed) plus the
        writes since the scan started, which since_full.active holds.
        """
        for b in self.catalog.lineage(newest.id):
            if b.kind == "full":
                break
            if b.checksums is None:
                return
            defined = ChecksumRecord.load(os.path.join(self.path, b.checksums)).defined
            dev.since_full.active.bits |= defined
        else:
            return  # no full in the lineage (imported chain): stay untrusted
        dev.since_full.trusted = True

    def _parent_for(self, name: str, kind: str) -> BackupRecord | None:
        if kind == "full":
            return None
        if kind == "differential":
            return self.catalog.last_full(name)
        return self.catalog.latest_backup(name)


def _failure_text(failure: BaseException | None) -> str:
    """What the job history says ended a job: a stop signal by its name
    (the CLI's stop exception carries only the number, "15")."""
    if isinstance(failure, KeyboardInterrupt):
        signum = getattr(failure, "signum", None)
        try:
            return f"interrupted by {signal.Signals(signum).name}" if signum else "interrupted (Ctrl-C)"
        except ValueError:
            return f"interrupted by signal {signum}"
    return str(failure) or "interrupted"


def _check_real_dirs(path: str, devices: list[str]) -> None:
    """Refuse a repository whose devices/ or a device's directory is a
    symlink: backupfs would write images, bitmaps and checksums (and remove
    them) wherever it points. Missing ones are made again by recovery."""
    for rel in ["devices"] + [f"devices/{name}" for name in devices]:
        where = os.path.join(path, rel)
        if os.path.islink(where):
            raise RepositoryError(f"{where} is a symlink; backupfs keeps its files only in real directories "
                                  "of the repository (remove the link, or put the directory back)", errno.ELOOP)
        if os.path.lexists(where) and not os.path.isdir(where):
            raise RepositoryError(f"{where} is not a directory", errno.ENOTDIR)


def _storage_error(e: OSError) -> RepositoryError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryError(f"repository disk full: {e.strerror}", errno.ENOSPC)
    where = f" {e.filename}" if e.filename else ""
    return RepositoryError(f"repository write failed{where}: {e.strerror}", e.errno or errno.EIO)


__all__ = ["Repository", "RepositoryError", "JobBusy", "BackupResult", "DeviceError", "KINDS"]
