"""A live device: reads and writes of the source, recorded in dirty bitmaps.

Two bitmaps per device: ``since_last`` (dirty since the previous backup of
any kind: what an incremental copies) and ``since_full`` (dirty since the
last full: what a differential copies). Every write marks both.

Writes and job starts are ordered by a gate: writes hold it shared (many
at once), starting or ending a job holds it exclusive. So every write lands
wholly before a backup's trigger instant (its bits are frozen into the job)
or wholly after (copy-before-write saves what it overwrites).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bitarray import bitarray

from engine.bitmap import (
    BitmapFileError,
    DirtyBitmap,
    SourceIdentity,
    TrackedBitmap,
    load_bitmap,
    save_bitmap,
)
from engine.catalog import DeviceRecord
from engine.devio import DeviceIO, new_device_io
from engine.errors import ErrnoError, is_disk_full
from engine.layout import bitmap_name
from engine.fsutil import file_size
from engine.nowait import WouldBlock, can_answer, edges_cached, read_cached
from engine.sourceid import PathRefused, SourceId, hold_path, kind_of, open_disk

if TYPE_CHECKING:
    from engine.job import BackupJob


class DeviceError(ErrnoError):
    """A device's source, its I/O or its saved state failed or was refused."""


class WriteGate:
    """Shared for writers, exclusive for job start and end.

    ``on_exclusive`` runs once the Python writers are out (it waits out the
    writes running in C: engine/devio.py), ``on_release`` before writers
    are let in again (it hands C the bitmaps that are active now).
    """

    def __init__(self, on_exclusive: Callable[[], None] | None = None,
                 on_release: Callable[[], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._exclusive = False
        self._on_exclusive = on_exclusive
        self._on_release = on_release

    def acquire_shared(self, wait: bool = True) -> bool:
        """Enter as a writer; without ``wait``, only if no job is starting or ending."""
        with self._cond:
            while self._exclusive:
                if not wait:
                    return False
                self._cond.wait()
            self._writers += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._writers -= 1
            if self._writers == 0:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True  # new writers wait from here on
            while self._writers:
                self._cond.wait()
        try:
            if self._on_exclusive is not None:
                self._on_exclusive()
            try:
                yield
            finally:
                if self._on_release is not None:
                    self._on_release()
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def bitmap_path(state_dir: str, which: str) -> str:
    return os.path.join(state_dir, bitmap_name(which))


def distrust_saved_bitmaps(state_dir: str, which: tuple[str, ...], reason: str) -> None:
    """Mark a closed device's persisted bitmaps untrusted, in place.

    For a change the bitmaps must account for while the device cannot be
    opened (its source is away): the next backup after it is back then
    scans instead of trusting bits that miss the change. A missing or
    unreadable bitmap is untrusted already. Raises OSError if it cannot
    be saved: the caller must then not make the change.
    """
    for name in which:
        path = bitmap_path(state_dir, name)
        try:
            stored = load_bitmap(path)
        except (FileNotFoundError, BitmapFileError):
            continue
        if stored.trusted:
            save_bitmap(path, stored.bitmap, stored.identity, stored.in_use, trusted=False, reason=reason)


class Device:
    """One registered device, opened for I/O."""

    def __init__(self, record: DeviceRecord, state_dir: str, has_backups: bool, peek: bool = False) -> None:
        """``peek``: only to look at (a repository whose disk is full): the
        bitmaps are read but never marked in use or saved."""
        self.record = record
        self.peek = peek
        self.name = record.name
        self.path = record.source
        self.size = record.size
        self.granularity = record.granularity
        self.state_dir = state_dir
        # What the source path must lead to: the recorded identity, or (a
        # catalog from before they were kept) what it leads to at this open.
        self.source_id = record.identity
        self.fd, self.read_only = self._open_source()
        self.writes_inline = can_answer(self.fd)  # see write(nowait=True)
        self.gate = WriteGate(on_exclusive=self._c_writes_out, on_release=self._c_writes_in)
        self._job: BackupJob | None = None
        self.untrusted_reason: str | None = None
        # What Python and the mount's C threads share (engine/devio.py): the
        # marks, and the source's modification time as our own writes left
        # it (one that moved otherwise means another program wrote the
        # file: see _noticed_outside_write; our writes in flight move it too).
        self.io = self._new_io()
        # Counts distrust() calls: a job that ends well trusts the bitmap
        # again only if nothing distrusted it while it ran.
        self.distrust_count = 0
        try:
            self.since_last = self._load("since-last", has_backups)
            self.since_full = self._load("since-full", has_backups)
            if not peek:
                self._persist(in_use=True)
        except BaseException:
            self._close_source()
            raise
        self._c_writes_in()  # it starts blocked

    def _new_io(self) -> DeviceIO:
        """The marks and mtime bookkeeping shared with the mount's C threads."""
        return new_device_io(self.fd, self.size, self.granularity, os.fstat(self.fd).st_mtime_ns)

    def _close_source(self) -> None:
        os.close(self.fd)
        self.fd = -1

    @property
    def job(self) -> BackupJob | None:
        """The backup running now: while there is one, writes copy before
        they write, in Python (the C path declines them)."""
        return self._job

    @job.setter
    def job(self, job: BackupJob | None) -> None:
        self._job = job
        self.io.set_writes(self._c_may_write())

    def _c_may_write(self) -> bool:
        """Writes may run in C: no job (copy-before-write is Python's), a writable source, not a peek."""
        return self._job is None and not self.read_only and not self.peek

    def _c_writes_out(self) -> None:
        """The gate is held exclusively: wait out the reads and writes running in C."""
        self.io.block()

    def _c_writes_in(self) -> None:
        """The gate is let go: C marks the bitmaps active now (a job's start
        froze the old ones), and writes there if no job runs."""
        self.io.set_bitmaps(self.since_last.active.bits, self.since_full.active.bits)
        self.io.set_writes(self._c_may_write())
        self.io.unblock()

    def _open_source(self) -> tuple[int, bool]:
        """(fd, read-only) of the source, which must still be the disk it was
        bound to (see engine/sourceid.py) and the registered size."""
        read_only = False
        try:
            try:
                fd, found = open_disk(self.path, os.O_RDWR, self.source_id)
            except PermissionError:
                fd, found = open_disk(self.path, os.O_RDONLY, self.source_id)
                read_only = True
        except PathRefused as e:
            raise self._refused(e.found) from None
        except FileNotFoundError:
            raise DeviceError(f"device {self.name}: source {self.path} does not exist", errno.EIO) from None
        except OSError as e:
            raise DeviceError(f"device {self.name}: cannot open source {self.path}: {e.strerror}") from None
        self.source_id = found
        actual = file_size(fd)
        if actual != self.size:
            os.close(fd)
            raise DeviceError(self._resized(actual), errno.EIO)
        return fd, read_only

    def _refused(self, found: str) -> DeviceError:
        """The one-line refusal of a source path that leads elsewhere: what
        it found, and how to bind the device to it if that is on purpose."""
        repo = os.path.dirname(os.path.dirname(self.state_dir))
        return DeviceError(
            f"device {self.name}: source {self.path} now leads to {found}; nothing is read from it or "
            f"written to it. If that is the device's disk now, rebind it: "
            f"backupfs device add --replace {repo} {self.name} {self.path}", errno.EIO)

    def _resized(self, actual: int) -> str:
        return (f"device {self.name}: source {self.path} is {actual} bytes, "
                f"registered as {self.size}; it changed size behind backupfs's back")

    def save_bitmaps(self) -> None:
        """Persist the bitmaps now (still in use): a change a crash must not lose."""
        self._persist(in_use=True)

    def distrust(self, reason: str) -> None:
        """Something changed the source that the bitmaps cannot have seen:
        the next incremental or differential compares checksums instead."""
        self.since_last.trusted = self.since_full.trusted = False
        self.untrusted_reason = reason
        self.distrust_count += 1

    # -- a backup's bitmaps: named operations, so that no one else writes their trust

    def job_committed(self, distrusts: int, full: bool) -> bool:
        """A backup's catalog row is committed: the bits its job froze are in
        it (abdicate; ``full``: since_full's too). The bitmaps are trusted
        again unless something distrusted them while the job ran (the count
        is no longer ``distrusts``, what it was at the job's start): whether
        they were. The caller holds the gate exclusively."""
        resynced = self.distrust_count == distrusts
        self.since_last.abdicate()
        self.since_last.trusted = resynced
        if full:
            self.since_full.abdicate()
            self.since_full.trusted = resynced
        return resynced

    def job_failed(self, full: bool) -> None:
        """A backup's job failed or was cancelled: the bits it froze are still
        to be copied (reclaim). The caller holds the gate exclusively."""
        self.since_last.reclaim()
        if full:
            self.since_full.reclaim()

    def reclaim_frozen(self, full: bool) -> None:
        """Undo a job's start, wherever it stopped: reclaim what it froze."""
        if self.since_last.frozen is not None:
            self.since_last.reclaim()
        if full and self.since_full.frozen is not None:
            self.since_full.reclaim()

    def resync_since_full(self, changed: list[bitarray]) -> None:
        """Make since_full trustworthy again after a checksum scan: what
        changed since the last full is ``changed`` (what each backup after
        it defined) plus the writes since the scan started, which
        since_full.active holds. The caller holds the gate exclusively."""
        for defined in changed:
            self.since_full.active.bits |= defined
        self.since_full.trusted = True

    def forget_backup(self, latest: bool, last_full: bool, defined: bitarray | None) -> None:
        """A backup is being removed: the bitmaps must not forget its changes.

        ``latest``: the next incremental backs onto its parent, so it must
        copy what the backup held too (``defined``; None: unknown, so the
        bitmap is distrusted). ``last_full`` (with no child left to hold
        its content): since_full has nothing to count from. Saved before
        the removal: once the catalog forgets it, an interruption must not
        leave a bitmap that forgot its changes.
        """
        with self.gate.exclusive():
            if latest:
                if defined is not None:
                    self.since_last.active.bits |= defined
                else:
                    self.since_last.trusted = False
                    self.untrusted_reason = "the latest backup was removed"
            if last_full:
                self.since_full.trusted = False
                self.untrusted_reason = "the last full backup was removed"
            self.save_bitmaps()

    def _noticed_outside_write(self, st: os.stat_result, racing: bool = False, begin: bool = False) -> bool:
        """Distrust the bitmaps if ``st`` shows a write that was not ours.

        Only a regular file says so (a block device node's time stays), and
        not a write within the same clock tick as one of ours, nor one that
        lands while one of ours is in flight (ours moves the time too).
        ``racing``: ``st`` was taken earlier, so a write of ours may have
        moved the time past it since; only a time newer than ours then
        tells. ``begin``: a write of ours starts, counted in the same
        hold of the bookkeeping's lock.
        """
        if not self.io.note_outside(st.st_mtime_ns, stat.S_ISREG(st.st_mode), racing, begin):
            return False
        self.distrust(f"its source {self.path} was written by another program, not through backupfs")
        return True

    def check_source(self) -> None:
        """Notice a source replaced, resized or removed behind our back.

        The caller holds the gate exclusively (no write in flight), as a
        job's start does. A device is bound to its source's identity: a
        path that now leads to another file or disk (``mv new.img
        src.img``, a symlink to another user's disk) or to something that
        is no disk at all is refused, until ``device add --replace`` binds
        it on purpose. A source that is gone or changed size is an error
        too: nothing is read from it or written to it as if it were the
        device, and the bitmaps are distrusted for when it is back.
        """
        try:
            probe, at_path = hold_path(self.path)
        except PathRefused as e:
            raise self._refused(e.found) from None
        except OSError as e:
            self.distrust(f"its source {self.path} went away behind backupfs's back")
            raise DeviceError(
                f"device {self.name}: source {self.path} is gone ({e.strerror}); "
                "it was removed or renamed behind backupfs's back", errno.EIO,
            ) from None
        os.close(probe)
        found = SourceId.of(at_path)
        if found != self.source_id:
            raise self._refused(found.describe() if found is not None else kind_of(at_path))
        held = os.fstat(self.fd)
        actual = file_size(self.fd)
        if actual != self.size:
            self.distrust(f"its source {self.path} changed size behind backupfs's back")
            raise DeviceError(self._resized(actual), errno.EIO)
        # Written by another program while we hold it (a VM started on the
        # image itself, say): the bitmap has not seen those writes.
        if self._noticed_outside_write(held):
            self._persist(in_use=True)

    def rebind(self, identity: SourceId) -> None:
        """Hold ``identity`` at the source path from now on, in place of the
        file held: the file a restore over the source wrote (backupfs made
        it, so it knows which it is). The caller holds the gate exclusively
        and records the identity in the catalog."""
        held = self.source_id
        self.source_id = identity
        try:
            fd, read_only = self._open_source()
        except DeviceError:
            self.source_id = held
            raise
        # dup2: readers in flight finish on the old file; the number
        # never names anything else in between.
        os.dup2(fd, self.fd)
        self.io.seen_mtime_ns = os.fstat(self.fd).st_mtime_ns
        self.writes_inline = can_answer(self.fd)
        os.close(fd)
        self.read_only = read_only

    def overwritten(self, reason: str) -> None:
        """The source is being rewritten on purpose (a restore over it):
        distrust the bitmaps for ``reason`` and save, so the next backup
        scans and a later ``status`` says why. The caller holds the gate
        exclusively."""
        self.distrust(reason)
        self.io.seen_mtime_ns = os.fstat(self.fd).st_mtime_ns
        self._persist(in_use=True)

    # -- bitmaps ------------------------------------------------------------------

    def _bitmap_path(self, which: str) -> str:
        return bitmap_path(self.state_dir, which)

    def identity(self) -> SourceIdentity:
        """What the source is: the file we hold open, not whatever the path names now."""
        return SourceIdentity.of_fd(self.fd, self.size)

    def _load(self, which: str, has_backups: bool) -> TrackedBitmap:
        path = self._bitmap_path(which)
        fresh = DirtyBitmap(self.size, self.granularity)
        try:
            stored = load_bitmap(path)
        except FileNotFoundError:
            if has_backups:
                self.untrusted_reason = "its bitmap file is missing"
            return TrackedBitmap(fresh, trusted=not has_backups)
        except BitmapFileError as e:
            self.untrusted_reason = f"its bitmap is unreadable ({e})"
            return TrackedBitmap(fresh, trusted=False)
        bm = stored.bitmap
        if (bm.size, bm.granularity) != (self.size, self.granularity):
            self.untrusted_reason = "its bitmap does not match the device"
            return TrackedBitmap(fresh, trusted=False)
        trusted = stored.trusted
        if stored.in_use:
            trusted = False
            self.untrusted_reason = "backupfs did not stop cleanly"
        elif not trusted:  # its own reason first (a rebind's, say: the file differs too then)
            if self.untrusted_reason is None:
                self.untrusted_reason = stored.reason or "no backup has re-synchronised it since it became untrusted"
        elif stored.identity != self.identity():
            trusted = False
            self.untrusted_reason = "the source changed behind backupfs's back"
        return TrackedBitmap(bm, trusted=trusted)

    def _persist(self, in_use: bool) -> None:
        if self.peek:
            return
        identity = self.identity()
        for which, tracked in (("since-last", self.since_last), ("since-full", self.since_full)):
            try:
                save_bitmap(self._bitmap_path(which), tracked.pending(), identity, in_use, tracked.trusted,
                            self.untrusted_reason)
            except OSError as e:
                full = " (the repository's disk is full)" if is_disk_full(e.errno) else ""
                raise DeviceError(f"device {self.name}: cannot save its {which} bitmap in {self.state_dir}: "
                                  f"{e.strerror}{full}", e.errno or errno.EIO) from None

    @property
    def trusted(self) -> bool:
        return self.since_last.trusted and self.since_full.trusted

    def dirty_bytes(self) -> tuple[int, int]:
        """Bytes marked since the last backup and since the last full (the
        active bitmaps), for `backupfs status`: what the next incremental
        and the next differential would copy without a scan."""
        return self.since_last.active.dirty_bytes(), self.since_full.active.dirty_bytes()

    # -- I/O --------------------------------------------------------------------------

    def read(
        self, offset: int, length: int, nowait: bool = False, into: bytearray | None = None
    ) -> bytes | bytearray:
        """Bytes of the source, clipped to the device size.

        With ``nowait``, raise WouldBlock unless the page cache holds them
        all (see engine/nowait.py): the mount reads inline what is cached
        and sends only misses to a thread. ``into``: a buffer to reuse when
        it is exactly the clipped length.
        """
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        try:
            if nowait:
                buf = into if into is not None and len(into) == length else bytearray(length)
                read_cached(self.fd, memoryview(buf), offset)
                return buf
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise DeviceError(f"device {self.name}: reading {self.path}: {e.strerror}", e.errno or errno.EIO) from None
        if len(data) < length:
            # The device is its registered size; a source that ends early
            # was cut behind our back. A short read would look like the end.
            self.distrust(f"its source {self.path} changed size behind backupfs's back")
            raise DeviceError(self._resized(file_size(self.fd)), errno.EIO)
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview, nowait: bool = False,
              timed: Callable[[float], None] | None = None) -> int:
        """Write through to the source; returns bytes written (short at the end).

        With ``nowait``, raise WouldBlock instead of waiting for a job's
        start or end, or running a job's copy-before-write, or reading a
        partly written page from disk, or writing to a file system that may
        wait on a network (one that cannot answer nowait reads): the mount
        writes inline only what cannot wait for those, and sends the rest to
        a thread. ``timed`` gets the seconds the write itself took (not the
        waits before it): what tells the mount the kernel is making writers
        wait.
        """
        if self.read_only:
            raise DeviceError(f"device {self.name}: source {self.path} is read-only", errno.EROFS)
        if offset >= self.size:
            raise DeviceError(f"device {self.name}: write at {offset} is past its end ({self.size})", errno.ENOSPC)
        view = memoryview(data)[: self.size - offset]
        length = len(view)
        if nowait:
            if self.job is not None or not self.writes_inline or not edges_cached(self.fd, offset, length):
                raise WouldBlock()
            if not self.gate.acquire_shared(wait=False):
                raise WouldBlock()
        else:
            self.gate.acquire_shared()
        try:
            job = self.job
            if job is not None:
                if nowait:
                    raise WouldBlock()
                job.before_write(offset, length)
            # A write past the end of a source cut behind our back would
            # grow it again around a hole: refuse, as reads past it do.
            before = os.fstat(self.fd)
            actual = file_size(self.fd, before)
            if actual < offset + length:
                self.distrust(f"its source {self.path} changed size behind backupfs's back")
                raise DeviceError(self._resized(actual), errno.EIO)
            # Mark first: a failed or short write may still have changed bytes.
            # (Both active bitmaps, atomically with the C path's marks.)
            self.io.mark(offset, length)
            # Another program's write since our last one: noticed now, before
            # ours moves the time again and hides it.
            self._noticed_outside_write(before, racing=True, begin=True)
            done = 0
            started = time.perf_counter()
            try:
                while done < length:
                    done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                raise DeviceError(
                    f"device {self.name}: writing {self.path}: {e.strerror}", e.errno or errno.EIO
                ) from None
            finally:
                # What our write made it (an error leaves it unknown: the
                # next look then sees a move and distrusts).
                try:
                    after = os.fstat(self.fd).st_mtime_ns
                except OSError:
                    after = 0
                self.io.end_write(after)
            if timed is not None:
                timed(time.perf_counter() - started)
        finally:
            self.gate.release_shared()
        return length

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DeviceError(f"device {self.name}: fsync {self.path}: {e.strerror}", e.errno or errno.EIO) from None

    def close(self) -> None:
        """Clean stop: sync the source, then persist the bitmaps as not in use."""
        if self.fd < 0:
            return
        if self.job is not None:
            self.job.cancel("the device is being closed")
        self.io.block()  # nothing more in C: the descriptor is closed below
        try:
            if not self.read_only:
                os.fsync(self.fd)
            # Saved as clean, the source's time becomes the one the next
            # open trusts: another program's write must be noticed first.
            self._noticed_outside_write(os.fstat(self.fd))
            self._persist(in_use=False)
        finally:
            self._close_source()
