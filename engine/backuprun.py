"""One backup of a device, from its plan to its end, in named steps.

The steps are QEMU's for a block job (block/backup.c, job.c), so that no
dirty bit and no file can fall between them:

- ``plan``: what to copy (kind, parent, scan or bitmap), under the
  device's gate, before anything is made;
- ``start``: freeze the bitmaps, name the backup, record its files as
  intents, build the job and register it, stop signals held back;
- ``prepare``: run the job, publish the image (engine/publish.py), commit
  the catalog row: the instant the backup becomes visible;
- ``commit``: the backup is there: the frozen bits are dropped
  (abdicate), the bitmaps trusted again if nothing distrusted them
  meanwhile, the intents forgotten;
- ``abort``: it is not: the frozen bits go back (reclaim), its files are
  removed, the job's history says why;
- ``clean``: either way, the device has no job any more.

Nothing changed since the parent makes no image (unless ``allow_empty``):
a trusted bitmap with no dirty bit is told in ``plan``, which then ends the
run before ``start`` (nothing frozen, nothing made); a checksum scan that
stores nothing is told in ``prepare``, which then publishes nothing, and
``commit`` drops the temporary image and trusts the bitmaps as a backup's
commit would. Either way the job's history says ``unchanged``.

A crash between any two steps leaves what the repository's recovery
(engine/repo.py) removes: only files recorded as intents that the catalog
does not name; a bitmap persisted as in use is untrusted at the next open.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from bitarray import bitarray

from engine import durable
from engine.bitmap import DirtyBitmap
from engine.catalog import BackupRecord, Catalog, CatalogError
from engine.checksums import ChecksumRecord
from engine.damage import damaged_ancestor, refusal as damage_refusal
from engine.device import Device
from engine.bitmap import bit_runs
from engine.ceph import CephError
from engine.errors import BackupfsError, ImageError, UsageError, is_disk_full
from engine.job import BackupJob, JobError, JobPlan, Progress, Source, copy_cluster_size, units_of
from engine.layout import BackupFiles, backup_id, device_dir, image_name
from engine.publish import publish
from engine.qcow2.format import MAX_CHAIN_DEPTH
from engine.qcow2.writer import Qcow2Writer
from engine.rbddevice import RbdDevice
from engine.rbdimage import RbdImage
from engine.rbdsnaps import RbdSnapshots
from engine.rbdsource import IN_FLIGHT_BYTES, RbdSource

# Sequence numbers an RBD backup tries when its snapshot's name is taken (see _take_rbd_named).
SNAPSHOT_NAME_TRIES = 4
from engine.repoerrors import JobBusy, RepositoryError, storage_error
from engine.space import data_runs, free_bytes, image_bound, room_text
from engine.stopsignals import STOP_SIGNALS
from engine.text import escape


class BackupHost(Protocol):
    """What a backup run needs of the repository it runs in."""

    path: str
    catalog: Catalog

    def chain_hashes(self, rec: BackupRecord) -> np.ndarray: ...

    def pruning(self, name: str) -> bool: ...

    def job_begins(self, name: str, job: BackupJob) -> None: ...

    def job_ends(self, name: str) -> None: ...

    def forget_intents(self, paths: list[str]) -> None: ...


@dataclass
class BackupResult:
    record: BackupRecord
    scanned: bool
    bytes_total: int
    bytes_written: int
    cbw_units: int
    seconds: float
    scan_reason: str | None = None
    # Nothing changed since ``record`` (an existing backup, the new one's
    # parent-to-be): no image was made, and ``record`` holds this point in time.
    unchanged: bool = False
    compress: str = "none"

    def summary(self) -> str:
        how = f"scanned ({self.scan_reason}), " if self.scanned else ""
        if self.unchanged:
            return (
                f"nothing changed since {escape(self.record.id)}; no backup was made "
                f"({how}{self.bytes_total} bytes examined in {self.seconds:.2f} s)"
            )
        # Compressed, the catalog's stored_bytes are the frames' bytes: say both.
        packed = f" (zstd: {self.record.stored_bytes} on disk)" if self.compress == "zstd" else ""
        return (
            f"{self.record.id}: {self.record.kind}, {how}"
            f"{self.bytes_written} bytes stored{packed} of {self.bytes_total} examined in {self.seconds:.2f} s"
        )


class BackupRun:
    """One backup of ``dev`` in ``host``; ``run`` takes it through its steps
    in this thread. Arguments as ``Repository.backup`` takes them."""

    def __init__(
        self,
        host: BackupHost,
        dev: Device,
        kind: str,
        *,
        cluster_size: int,
        scan: bool,
        label: str | None,
        auto_full: bool,
        on_progress: Callable[[Progress], None] | None,
        cancel: threading.Event | None,
        source_factory: Callable[[Device], Source] | None,
        chunk_bytes: int,
        rate: int | None,
        force: bool = False,
        allow_empty: bool = False,
        compress: str = "none",
    ) -> None:
        self.host = host
        self.catalog = host.catalog
        self.dev = dev
        self.name = dev.name
        self.kind = kind
        self.cluster_size = cluster_size
        self.scan = scan
        self.label = label
        self.auto_full = auto_full
        self.on_progress = on_progress
        self.cancel = cancel
        self.source_factory = source_factory
        self.chunk_bytes = chunk_bytes
        self.rate = rate
        self.force = force  # a full that may not fit the repository's disk is tried anyway
        self.allow_empty = allow_empty
        self.compress = compress
        self.started = time.monotonic()
        self.created_ns = time.time_ns()
        # Set by plan:
        self.distrusts = 0
        self.parent: BackupRecord | None = None
        self.scan_reason: str | None = None
        self.plan_scan = False
        self.parent_hashes: np.ndarray | None = None
        # Set by plan (a full) or start: what it may write, and the room there was.
        self.needed: int | None = None
        self.free: int | None = None
        # Set by plan (the bitmap says so) or prepare (a scan found it):
        # nothing changed since the parent, and no image is made.
        self.unchanged = False
        # Set by start:
        self.writer: Qcow2Writer | None = None
        self.files: BackupFiles | None = None
        self.intents: list[str] = []
        self.held: set[signal.Signals] | None = None
        self.frozen_full: DirtyBitmap | None = None
        self.seq = 0
        self.checksums: ChecksumRecord | None = None
        self.job: BackupJob | None = None
        # Set by prepare:
        self.job_id: int | None = None
        self.rec: BackupRecord | None = None
        # An RBD source (engine/rbdsnaps.py): its snapshots, the one this
        # backup diffs from (set by plan) and the one it takes (by start).
        self.snaps: RbdSnapshots | None = None
        self.rbd_base: str | None = None
        self.rbd_latest: BackupRecord | None = None
        # Whether ``rbd_base`` is still to be found (while the snapshot is taken).
        self.rbd_base_pending = False
        self.rbd_snap: tuple[str, int | None] | None = None
        # The snapshot set by start (the device's reader) to ask RBD what changed, then read.
        self.rbd_view: RbdImage | None = None
        self.source: Source | None = None

    def run(self) -> BackupResult:
        """Plan, start, prepare, then commit or abort, then clean."""
        dev = self.dev
        if isinstance(dev, RbdDevice):
            # The previous backup's removal of older snapshots, waited for
            # before the gate: under it, writes through the mount waited
            # too (_plan_rbd settles again, under it, for one started since).
            dev.settle()
        with dev.gate.exclusive():
            self.plan()
            if not self.unchanged:
                self.start()
        if self.unchanged:
            return self._nothing_to_copy()
        ok = False
        failure: BaseException | None = None
        try:
            self.prepare()
            ok = True
        except BaseException as e:
            failure = e
            raise
        finally:
            try:
                committed: bool | None = ok
                if not ok and failure is not None:
                    # Interrupted (Ctrl-C) after the catalog commit returned:
                    # the backup is there, whole; its files must stay.
                    committed = self._committed()
                if committed:
                    self.commit()
                else:
                    self.abort(failure, doubt=committed is None)
            finally:
                self.clean()
        assert self.job is not None
        held = self.parent if self.unchanged else self.rec
        assert held is not None
        return BackupResult(
            held, self.plan_scan, self.job.progress.total, self.job.progress.written, self.job.cbw_units,
            time.monotonic() - self.started, self.scan_reason, unchanged=self.unchanged, compress=self.compress,
        )

    # -- the steps ------------------------------------------------------------------

    def plan(self) -> None:
        """What this backup copies, decided with the gate held: refused if
        the device is busy, its source changed, or it has no full to build on."""
        dev, name, kind = self.dev, self.name, self.kind
        if self.host.pruning(name):
            raise JobBusy(f"backups of {name} are being pruned; try again when that is done")
        if dev.job is not None:
            p = dev.job.progress
            raise JobBusy(
                f"a backup of {name} is already running: {p.done} of {p.total} bytes done "
                f"({100 * p.fraction():.0f}%)"
            )
        if not isinstance(dev, RbdDevice):  # an image's is checked while its snapshot is taken (start)
            dev.check_source()  # replaced: follow it (and scan); resized or gone: refuse
        self.distrusts = dev.distrust_count  # one while the job runs: the next backup scans
        parent = self._parent_for(kind)
        if parent is None and kind != "full":
            if not self.auto_full:
                raise UsageError(f"device {name} has no full backup yet; take a full backup first "
                                 "(or ask for auto_full=1 in the trigger, --auto-full to 'backupfs backup')")
            kind = "full"
        lineage = self.catalog.lineage(parent.id) if parent is not None and kind != "full" else []
        if parent is not None and kind != "full":
            found = damaged_ancestor(self.catalog, lineage)
            if found is not None:
                if not self.auto_full:
                    raise damage_refusal(name, kind, *found)
                kind, parent = "full", None  # a new chain, on nothing damaged
                lineage = []
        if parent is not None and kind != "full" and not self.allow_empty and not self.scan \
                and not isinstance(dev, RbdDevice):  # other clients write an image unseen: RBD's diff tells
            tracked = dev.since_full if kind == "differential" else dev.since_last
            if tracked.trusted and not tracked.active.count():
                # A trusted bitmap with no dirty bit: the device reads as
                # ``parent`` does. Decided before anything is frozen or
                # made (and before the chain's depth matters: no layer is
                # added), so the bitmaps are not touched at all.
                self.kind, self.parent, self.unchanged = kind, parent, True
                return
        depth = len(lineage) + 1
        if depth > MAX_CHAIN_DEPTH:
            # The new image could not be read back: no reader (ours,
            # following QEMU's backing links) goes deeper.
            if not self.auto_full:
                raise UsageError(
                    f"device {name}: a new {kind} would be backup {depth} of its chain, and a chain reads "
                    f"through at most {MAX_CHAIN_DEPTH} images; take a full backup (or ask for auto_full=1 "
                    "in the trigger, --auto-full to 'backupfs backup'), or prune old backups, which "
                    "merges them"
                )
            kind, parent = "full", None
        if kind == "full":
            self._check_room_for_full()
        tracked = dev.since_full if kind == "differential" else dev.since_last
        scan_reason = None
        if isinstance(dev, RbdDevice):
            scan_reason = self._plan_rbd(dev, kind)
        elif kind != "full":
            if self.scan:
                scan_reason = "requested"
            elif not tracked.trusted:
                scan_reason = f"bitmap untrusted: {dev.untrusted_reason or 'unknown'}"
        self.kind, self.parent, self.scan_reason = kind, parent, scan_reason
        self.plan_scan = scan_reason is not None
        # An RBD image's incremental compares too (see _plan_rbd), so it needs
        # the chain's checksums: loaded while its snapshot is taken.
        if self.plan_scan and parent and self.snaps is None:
            self.parent_hashes = self.host.chain_hashes(parent)

    def _plan_rbd(self, dev: RbdDevice, kind: str) -> str | None:
        """An RBD image's plan: remove snapshots a killed run left; why it
        must scan, if asked to (None otherwise). Whether the previous
        backup's snapshot can say what changed is found out while this
        backup's own is taken (``_beside_the_snapshot``).

        RBD reports an object that did not exist at the older snapshot
        from its start to its last written byte (139 MiB reported for
        8.5 MiB written, measured), so its incrementals compare what they
        read with the chain's checksums and store only copy clusters that
        differ: a zero cluster over zeros is not stored, zeros over data
        are (as zero clusters), and a cluster rewritten with the bytes it
        had costs nothing.
        """
        assert dev.image is not None
        dev.settle()  # the previous backup's removal of older snapshots, if still going
        self.snaps = snaps = RbdSnapshots(self.catalog, self.name, dev.image)
        self.rbd_latest = latest = self.catalog.latest_backup(self.name)
        try:
            snaps.tidy(latest.id if latest is not None else None)
        except CephError as e:
            raise JobError(f"device {self.name}: {e}", e.errno or errno.EIO) from None
        if kind == "full":
            return None
        if self.scan:
            return "requested"
        self.rbd_base_pending = True
        return None

    def start(self) -> None:
        """Freeze the bitmaps, record the files as intents, build the job and
        register it; anything failing (a Ctrl-C included) undoes all of it,
        or close() would wait for the job forever."""
        dev, kind, cluster_size = self.dev, self.kind, self.cluster_size
        unit = copy_cluster_size(dev.granularity, cluster_size)
        # Freeze the bitmaps this kind consumes; a differential reads
        # since_full without consuming it (the next differential needs it).
        try:
            frozen_last = dev.since_last.freeze()
            self.frozen_full = dev.since_full.freeze() if kind == "full" else None
            if kind == "full" or self.plan_scan:
                units = units_of([(0, dev.size)], unit, dev.size)
            elif kind == "incremental":
                units = units_of(frozen_last.runs(), unit, dev.size)
            else:
                units = units_of(dev.since_full.active.runs(), unit, dev.size)
            allocated = None
            if self.snaps is not None:
                # Named now (the seq is the id's), taken at once: this is the point in time.
                units, allocated = self._take_rbd_named(dev, units, unit)
            if self.needed is None:
                self.needed = image_bound(units.count(), unit, cluster_size, dev.size, dev.granularity)
                self.free = free_bytes(device_dir(self.host.path, self.name))

            if self.snaps is None:
                self.seq = self.catalog.next_seq()
            self.files = files = BackupFiles(self.host.path, self.name, backup_id(self.created_ns, self.seq, kind))
            # Recorded before they exist: after a crash, recovery removes these (and only these).
            self.intents = files.intents()
            self.catalog.record_intents("file", self.intents)
            parent = self.parent
            self.writer = Qcow2Writer(
                files.tmp,
                dev.size,
                cluster_size,
                backing_file=image_name(parent.id) if parent else None,
                backing_format="qcow2" if parent else None,
                compress=self.compress,
            )
            plan = JobPlan(dev.size, dev.granularity, cluster_size, units, kind != "full", self.parent_hashes)
            self.checksums = ChecksumRecord(dev.size, dev.granularity)
            read_ahead = {}
            if self.source_factory:
                source = self.source_factory(dev)
            elif isinstance(dev, RbdDevice):
                assert self.rbd_view is not None
                # The snapshot already set for the diff: the device's reader, lent.
                source = RbdSource(self.rbd_view, dev.size, unit, allocated, own=False)
                read_ahead = {"read_ahead": IN_FLIGHT_BYTES * 3 // 4}
                # The run the job claims first, before the read-ahead it asks for
                # after it; only that under the gate (issuing 48 MiB of aio took 50 ms).
                source.prime(units, self.chunk_bytes)
            else:
                source = Source(dev.fd, dev.path, dev.size)
            self.source = source
            job = BackupJob(
                plan, source, self.writer, self.checksums, kind=kind, on_progress=self.on_progress,
                cancel=self.cancel, chunk_bytes=self.chunk_bytes, rate=self.rate, **read_ahead,
            )
            self.job = job
            # From registering the job to inside the try that undoes it,
            # a stop signal (whose handler raises: Ctrl-C, a CLI's
            # SIGTERM) is held back: raised in between (leaving the
            # gate, say), it left the job registered and close() waiting
            # for it forever.
            self.held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            dev.job = job
            self.host.job_begins(self.name, job)
        except BaseException:
            self._undo_start()
            raise

    def _take_rbd_named(self, dev: RbdDevice, tracked: bitarray, unit: int) -> tuple[bitarray, bitarray | None]:
        """``_take_rbd`` under this backup's id; its name held by another
        repository backing up the same image (ids are only unique within a
        repository: two cron jobs in the same second with alike sequence
        numbers), under the next sequence number, a few times."""
        for attempt in range(SNAPSHOT_NAME_TRIES):
            self.seq = self.catalog.next_seq()
            try:
                return self._take_rbd(dev, backup_id(self.created_ns, self.seq, self.kind), tracked, unit)
            except JobError as e:
                if e.errno != errno.EEXIST or attempt == SNAPSHOT_NAME_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _take_rbd(self, dev: RbdDevice, ident: str, tracked: bitarray, unit: int
                  ) -> tuple[bitarray, bitarray | None]:
        """Take this backup's snapshot of the image; what to copy from it
        (``tracked``: what the bitmaps say, writes through the mount, which
        RBD's diff reports too) and where it holds data (None: not asked).

        Under the gate: no write through the mount lands between the
        snapshot and the frozen bitmaps.
        """
        snaps = self.snaps
        assert snaps is not None
        try:
            # Stops held from before the snapshot's thread starts until it
            # is known whether the snapshot exists (and, if so, the undo
            # would remove it): raised in between, nothing waited for the
            # thread, the undo ran while the snapshot was being made (it
            # stayed), and the wait's own unmasking raised one before it
            # had noted the snapshot made. What runs beside it is cluster
            # calls (which a stop cannot cut short anyway: bounded by
            # their timeout) and the chain's checksums.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                taking = snaps.begin(ident)
                try:
                    self._beside_the_snapshot(dev, snaps)
                except BaseException:
                    # What failed beside it is what is told: the snapshot's
                    # own failure must not replace it.
                    try:
                        taking.wait()
                    except CephError:
                        pass  # not made (or not ours): nothing for the undo
                    finally:
                        if taking.made:  # the undo removes it
                            self.rbd_snap = (taking.name, None)
                    raise
                try:
                    name = taking.wait()
                finally:
                    if taking.made:  # from here on, a failure's undo removes it
                        self.rbd_snap = (taking.name, None)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop held back is raised here
            # Set for the job's reads (start hands it to the source).
            self.rbd_view = snap = dev.snapshot(name)
            self.rbd_snap = (name, snap.snapshot_id(name))
            snaps.taken(*self.rbd_snap)
            if self.kind == "full" or self.plan_scan:
                return units_of([(0, dev.size)], unit, dev.size), snap.allocated_units(unit, dev.size)
            units = tracked | snap.changed_units(self.rbd_base, unit, dev.size)
            if self.kind == "differential":
                latest = self.catalog.latest_backup(self.name)
                changed = self._since_full_changes(latest) if latest is not None else None
                if changed is None:
                    units.setall(1)  # unknown since the full: compare everything
                else:
                    g = dev.granularity
                    for defined in changed:
                        units |= units_of(((a * g, b * g) for a, b in bit_runs(defined)), unit, dev.size)
            return units, None
        except CephError as e:
            raise JobError(f"device {self.name}: {e}", e.errno or errno.EIO) from None

    def _beside_the_snapshot(self, dev: RbdDevice, snaps: RbdSnapshots) -> None:
        """What an RBD backup must know before it reads, found out while its
        snapshot is taken (``RbdSnapshots.begin``): the image the name leads
        to is still the one bound, at its size (refused, the snapshot is
        removed by the undo); whether the previous backup's snapshot can
        say what changed (if not: a scan, and why); the chain's checksums
        that what is read is compared with."""
        listed = dev.checked_snapshots()
        if self.rbd_base_pending:
            self.rbd_base, why = snaps.base(self.rbd_latest, listed)
            self.rbd_base_pending = False
            if why is not None:
                self.scan_reason, self.plan_scan = why, True
        if self.kind != "full" and self.parent is not None and self.parent_hashes is None:
            self.parent_hashes = self.host.chain_hashes(self.parent)

    def _undo_start(self) -> None:
        """Anything (a Ctrl-C included) before the job is under way: undo all of it."""
        dev = self.dev
        if self.source is not None:
            self.source.close()  # clean() runs only after a start that worked
            self.source = None
        self._drop_rbd_snapshot()
        dev.job = None
        self.host.job_ends(self.name)
        if self.writer is not None:
            self.writer.abort()
        if self.files is not None:
            try:
                durable.fs.unlink(self.files.tmp)
            except FileNotFoundError:
                pass
        self.host.forget_intents(self.intents)
        dev.reclaim_frozen(full=self.kind == "full")
        if self.held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.held)

    def prepare(self) -> None:
        """Run the job, publish its image, and commit the catalog row that
        makes the backup visible; the job's history is recorded with it."""
        assert self.job is not None and self.writer is not None and self.files is not None
        assert self.checksums is not None and self.held is not None
        job, writer, files, name = self.job, self.writer, self.files, self.name
        try:
            try:
                # Still held while the job's row is written: a stop landing
                # after its commit but before job_id is set left the row
                # 'running' with no one to finish it (status then said the
                # process died, not that it was cancelled).
                self.job_id = self.catalog.job_started(name, self.kind)  # inside: a failure here must undo the above
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, self.held)  # a stop held back lands here
            job.run()
            if self._scan_found_nothing():
                assert self.parent is not None
                self.unchanged = True
                self.catalog.job_finished(
                    self.job_id, "unchanged", backup=self.parent.id, total=job.progress.total,
                    done=job.progress.done, written=0, scanned=self.plan_scan)
                return
            publish(writer, self.checksums, files)
        except OSError as e:
            raise self._explained(storage_error(e)) from None
        except ImageError as e:
            if is_disk_full(e.errno):
                raise self._explained(RepositoryError(f"repository disk full: {e}", errno.ENOSPC)) from None
            raise
        except BackupfsError as e:  # the job's own (JobError): its writes to the image
            if is_disk_full(e.errno):
                raise self._explained(e) from None
            raise
        parent = self.parent
        self.rec = BackupRecord(
            id=files.ident,
            device=name,
            seq=self.seq,
            kind=self.kind,
            parent=parent.id if parent else None,
            created_ns=self.created_ns,
            size=self.dev.size,
            cluster_size=self.cluster_size,
            granularity=self.dev.granularity,
            image=files.image_rel,
            checksums=files.sums_rel,
            stored_bytes=writer.stored_bytes(),
            label=self.label,
            scanned=self.plan_scan,
        )
        finished = dict(backup=files.ident, total=job.progress.total, done=job.progress.done,
                        written=job.progress.written, scanned=self.plan_scan)
        assert self.job_id is not None
        try:
            # The instant it becomes visible (with the RBD snapshot it was read from).
            self.catalog.add_backup(self.rec, job=(self.job_id, finished),
                                    rbd_snapshot=self.rbd_snap[0] if self.rbd_snap else None)
        except CatalogError as e:
            raise self._explained(e) from None

    def commit(self) -> None:
        """The backup is in the catalog: its frozen bits are dropped, the
        bitmaps trusted again unless something the bitmap cannot have seen
        happened while the job ran."""
        dev = self.dev
        newest = self.parent if self.unchanged else self.rec
        assert newest is not None
        # Exclusive: waits for writes in flight, whose copy-before-write
        # may still be writing into the image; none starts after this.
        with dev.gate.exclusive():
            if not self.unchanged and self.snaps is not None and self.rec is not None:
                # Older snapshots removed once the backup has answered (its
                # trigger's write, the CLI's line); failing, the next
                # backup's tidy removes them. Started before the device is
                # let go (``dev.job``): a next backup starting then settles
                # it first; started after, it found nothing to wait for,
                # and the removal took that backup's new snapshot too.
                assert isinstance(dev, RbdDevice)
                dev.after_backup(functools.partial(self.snaps.keep_only, self.rec.id))
            dev.job = None
            if self.unchanged and not self._parent_is_latest():
                # A differential found the device as its full left it, but
                # a later backup (the next incremental's parent) differs:
                # what was dirty since that one still is, and nothing is
                # trusted that was not (the next differential scans again).
                dev.job_failed(full=False)
            else:
                resynced = dev.job_committed(self.distrusts, full=self.frozen_full is not None)
                if self.frozen_full is None and self.plan_scan and not dev.since_full.trusted and resynced:
                    changed = self._since_full_changes(newest)
                    if changed is not None:
                        dev.resync_since_full(changed)
        if self.unchanged:
            assert self.writer is not None and self.files is not None
            self.writer.abort()  # after the gate: see abort
            self._unlink(self.files.tmp)
            self._drop_rbd_snapshot()  # the parent's holds this point in time already
        self.host.forget_intents(self.intents)

    def abort(self, failure: BaseException | None, doubt: bool) -> None:
        """The backup is not in the catalog (``doubt``: cannot tell): its
        frozen bits go back, its files go (in doubt, only the temporary:
        the next open removes the recorded files the catalog does not
        name), and the job's history says why it ended."""
        dev, writer = self.dev, self.writer
        assert writer is not None and self.files is not None and self.job is not None
        with dev.gate.exclusive():
            dev.job = None
            dev.job_failed(full=self.frozen_full is not None)
        if not doubt:
            # In doubt the snapshot stays, as the files do: committed, its row
            # names the backup and it is the one kept; not, the next
            # backup's tidy removes it (its row names no backup).
            self._drop_rbd_snapshot()
        # Only now: closed earlier, the image's descriptor could be
        # reused by another file while a copy-before-write still
        # held its number.
        writer.abort()
        files = self.files
        for leftover in (files.tmp,) if doubt else (files.tmp, files.image, files.sums):
            self._unlink(leftover)
        if not doubt:
            self.host.forget_intents(self.intents)
        cancelled = isinstance(failure, KeyboardInterrupt) or (
            isinstance(failure, JobError) and failure.errno == errno.ECANCELED)
        job = self.job
        try:
            if self.job_id is not None:
                self.catalog.job_finished(
                    self.job_id, "cancelled" if cancelled else "failed", total=job.progress.total,
                    done=job.progress.done, written=job.progress.written, scanned=self.plan_scan,
                    error=failure_text(failure),
                )
        except CatalogError:
            pass  # history only (a full disk): the error that stopped the job matters

    def clean(self) -> None:
        """Whatever the end: the device has no running job any more, and
        its source holds no read in flight."""
        self._close_reads()
        self.host.job_ends(self.name)

    def _close_reads(self) -> None:
        """Close what reads this backup's source: in-flight reads waited for,
        the device's reader back from the RBD snapshot (before the snapshot
        is removed). Again: a no-op."""
        if self.source is not None:
            self.source.close()
        if self.rbd_view is not None:
            assert isinstance(self.dev, RbdDevice)
            self.dev.leave_snapshot()
            self.rbd_view = None

    def _drop_rbd_snapshot(self) -> None:
        """This backup's RBD snapshot, if it took one, goes (it is not a backup's)."""
        if self.snaps is not None and self.rbd_snap is not None:
            self._close_reads()
            self.snaps.drop(*self.rbd_snap)
            self.rbd_snap = None

    # -- nothing changed --------------------------------------------------------------

    def _nothing_to_copy(self) -> BackupResult:
        """The bitmap says nothing changed since the parent: no image, no
        catalog row, the bitmaps as they were; the job's history says so."""
        assert self.parent is not None
        try:
            job_id = self.catalog.job_started(self.name, self.kind)
            self.catalog.job_finished(job_id, "unchanged", backup=self.parent.id, total=0, done=0, written=0)
        except CatalogError:
            pass  # history only: nothing else was to be written
        return BackupResult(self.parent, False, 0, 0, 0, time.monotonic() - self.started, unchanged=True)

    def _scan_found_nothing(self) -> bool:
        """A checksum scan stored nothing: every granule read as the parent's
        chain has it, so a new layer would be empty (unless one is asked for)."""
        compared = self.plan_scan or self.parent_hashes is not None
        return (compared and not self.allow_empty and self.parent is not None
                and self.checksums is not None and not self.checksums.defined.any())

    def _parent_is_latest(self) -> bool:
        latest = self.catalog.latest_backup(self.name)
        return self.parent is not None and latest is not None and latest.id == self.parent.id

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            durable.fs.unlink(path)
        except FileNotFoundError:
            pass

    # -- helpers ----------------------------------------------------------------------

    def _check_room_for_full(self) -> None:
        """Refuse a full that cannot fit before anything is made (unless forced
        or compressed): its bound is the source's data (SEEK_DATA; all of it
        where that cannot tell), as whole copy clusters, with the image's tables."""
        dev = self.dev
        unit = copy_cluster_size(dev.granularity, self.cluster_size)
        runs = data_runs(dev.fd, dev.size) if dev.fd >= 0 else iter([(0, dev.size)])
        self.needed = image_bound(units_of(runs, unit, dev.size).count(), unit, self.cluster_size, dev.size,
                                  dev.granularity)
        self.free = free_bytes(device_dir(self.host.path, self.name))
        # Compressed, the bound is what the image holds if nothing packs,
        # not what it will hold: refused by it, a full that packs into a
        # tenth of the free space never ran (every night of a schedule).
        # Tried, one that does not fit still fails saying both numbers.
        packs = self.compress not in (None, "none")
        if not self.force and not packs and self.free is not None and self.needed > self.free:
            raise RepositoryError(
                f"device {self.name}: a full backup does not fit on the repository's disk: "
                f"{room_text(self.needed, self.free)}; free some space (backupfs prune) or try anyway "
                "with --force (force=1 in the trigger): the bound counts every allocated cluster of the "
                "source, and zeros are not stored", errno.ENOSPC)

    def _explained(self, e: BackupfsError) -> BackupfsError:
        """A disk-full failure that says how much the backup needed and how
        much was free when it started; any other failure as it is."""
        if not is_disk_full(e.errno) or self.needed is None:
            return e
        room = room_text(self.needed, self.free, "the backup needed", " when it started")
        return RepositoryError(f"{e}; {room}", errno.ENOSPC)

    def _committed(self) -> bool | None:
        """Whether the catalog names the backup (None: it cannot say)."""
        if self.files is None:
            return False
        try:
            return self.catalog.backup(self.files.ident) is not None
        except Exception:  # noqa: BLE001 - any doubt keeps the files
            return None

    def _since_full_changes(self, newest: BackupRecord) -> list[bitarray] | None:
        """What changed since the last full, after a checksum scan: what
        each backup after it defined (each copied at least the granules
        that differed). None if that cannot be told: a backup without
        checksums, or no full in the lineage (an imported chain)."""
        changed = []
        for b in self.catalog.lineage(newest.id):
            if b.kind == "full":
                return changed
            if b.checksums is None:
                return None
            changed.append(ChecksumRecord.load(os.path.join(self.host.path, b.checksums)).defined)
        return None

    def _parent_for(self, kind: str) -> BackupRecord | None:
        if kind == "full":
            return None
        if kind == "differential":
            return self.catalog.last_full(self.name)
        return self.catalog.latest_backup(self.name)


def failure_text(failure: BaseException | None) -> str:
    """What the job history says ended a job: a stop signal by its name
    (the CLI's stop exception carries only the number, "15")."""
    if isinstance(failure, KeyboardInterrupt):
        signum = getattr(failure, "signum", None)
        try:
            return f"interrupted by {signal.Signals(signum).name}" if signum else "interrupted (Ctrl-C)"
        except ValueError:
            return f"interrupted by signal {signum}"
    return str(failure) or "interrupted"
