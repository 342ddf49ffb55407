"""A device whose source is an RBD image: I/O through librbd.

Everything a Device does with bitmaps, gates and jobs stays (engine/device.py);
what differs is where the bytes are and how a change behind our back shows:

- reads and writes go to the image's head through librbd (no descriptor,
  so nothing is served in C and nothing nowait: the mount sends every
  request to a thread);
- a backup reads an RBD snapshot taken at its trigger (engine/rbdsnaps.py),
  so a write during a job needs no copy-before-write;
- other clients (the VM itself, through librbd) write the image without
  us: the bitmaps see only writes through the mount, and what a backup
  copies comes from RBD's own diff (the bitmap is added to it). So the
  bitmaps' trust does not decide scans here; the previous snapshot does.
- the image is held by its id: one removed and made again under its name,
  or renamed away, is refused as a file source replaced behind our back is.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from collections.abc import Callable

from engine.bitmap import SourceIdentity
from engine.catalog import DeviceRecord
from engine.ceph import CephError, Cluster, RbdSpec, from_record
from engine.device import Device, DeviceError
from engine.devio import DeviceIO, PythonDeviceIO
from engine.nowait import WouldBlock
from engine.rbdimage import RbdImage
from engine.sourceid import RBD, SourceId
from engine.stopsignals import STOP_SIGNALS, no_stops_in_new_threads

log = logging.getLogger(__name__)


def rbd_identity(cluster: Cluster, image: RbdImage) -> SourceId:
    """What an RBD image is: its pool and librbd's id for it."""
    return SourceId(RBD, dev=int(cluster.ioctx.get_pool_id()) if hasattr(cluster.ioctx, "get_pool_id")
                    else 0, image=image.image_id())


class RbdDevice(Device):
    """One registered device on an RBD image, opened for I/O."""

    def __init__(self, record: DeviceRecord, state_dir: str, has_backups: bool, peek: bool = False) -> None:
        self.spec: RbdSpec = from_record(record.source, record.ceph)
        self.cluster: Cluster | None = None
        self.image: RbdImage | None = None
        # One handle for the backups' snapshots, set to each in turn
        # (``snapshot``): 3 ms, where opening one took 6-7 ms and closing
        # it a round trip, per backup.
        self.reader: RbdImage | None = None
        # What ``after_backup`` runs once a backup has answered.
        self._after: threading.Thread | None = None
        super().__init__(record, state_dir, has_backups, peek)

    # -- the source ---------------------------------------------------------------------

    def _open_source(self) -> tuple[int, bool]:
        try:
            self.cluster = Cluster(self.spec)
            self.image = RbdImage(self.cluster)
            found = rbd_identity(self.cluster, self.image)
            actual = self.image.size()
        except CephError as e:
            self._close_source()
            raise DeviceError(f"device {self.name}: {e}", e.errno or errno.EIO) from None
        if self.source_id is not None and found != self.source_id:
            self._close_source()
            raise self._refused(found.describe())
        self.source_id = found
        if actual != self.size:
            self._close_source()
            raise DeviceError(self._resized(actual), errno.EIO)
        return -1, False

    def _new_io(self) -> DeviceIO:
        return PythonDeviceIO(-1, self.size, self.granularity, 0)

    def _close_source(self) -> None:
        self.settle()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.image is not None:
            self.image.close()
            self.image = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def _image(self) -> RbdImage:
        if self.image is None:
            raise DeviceError(f"device {self.name}: its image {self.spec.source} is closed", errno.EIO)
        return self.image

    def snapshot(self, name: str) -> RbdImage:
        """The image as snapshot ``name`` holds it, read-only (a backup's
        source): the device's reader, set to it. One backup at a time uses
        it (the device has one job); ``leave_snapshot`` when done."""
        assert self.cluster is not None
        if self.reader is not None:
            try:
                self.reader.set_snapshot(name)
                return self.reader
            except CephError as e:
                # Not heard of yet (the snapshot's notice to watchers timed
                # out): a handle opened now reads the image's header afresh.
                self.reader.close()
                self.reader = None
                if e.errno != errno.ENOENT:
                    raise
        # Opened as the head's is, not read-only: a read-only handle watches
        # nothing, so it never hears of a new snapshot and cannot be set to
        # one. Set to a snapshot, it writes nothing.
        reader = RbdImage(self.cluster)
        try:
            reader.set_snapshot(name)
        except CephError:
            reader.close()
            raise
        self.reader = reader
        return reader

    def leave_snapshot(self) -> None:
        """The reader back at the head (nothing reads or writes through it
        there), so the snapshot it was set to can go. Failing, the reader
        is closed: the next backup opens another."""
        if self.reader is None or self.reader.snapshot is None:
            return
        try:
            self.reader.set_snapshot(None)
        except CephError:
            self.reader.close()
            self.reader = None

    def check_source(self) -> None:
        """The image is still the one bound (same id), and still its size.

        The caller holds the gate exclusively. A resized image is refused
        as a resized file is (its backups are its registered size), and
        the bitmaps are distrusted for when it is back.
        """
        self.checked_snapshots()

    def checked_snapshots(self) -> dict[str, int]:
        """``check_source``, and the image's snapshots (name -> id) as the
        same open of it by name found them.

        A backup calls this while the device's own handle takes its
        snapshot (engine/rbdsnaps.py): everything is asked of the handle
        opened for the check, none of that one, whose size or listing
        asked meanwhile would read the image's header again in the middle
        of the snapshot's making. (Reads through the mount's device file
        may still go to it then: librbd serves I/O beside its own work.)
        """
        self._image()  # a closed device says so, not the probe's open
        assert self.cluster is not None
        try:
            probe = RbdImage(self.cluster)
            try:
                found, actual, listed = rbd_identity(self.cluster, probe), probe.size(), probe.snapshots()
            finally:
                probe.close()
        except CephError as e:
            if e.errno == errno.ENOENT:
                self.distrust(f"its source {self.spec.source} went away behind backupfs's back")
            raise DeviceError(f"device {self.name}: {e}", e.errno or errno.EIO) from None
        if found != self.source_id:
            raise self._refused(found.describe())
        if actual != self.size:
            self.distrust(f"its source {self.spec.source} changed size behind backupfs's back")
            raise DeviceError(self._resized(actual), errno.EIO)
        return listed

    # -- after a backup -------------------------------------------------------------------

    def after_backup(self, work: Callable[[], object]) -> None:
        """Run ``work`` (removing the snapshots older than the backup just
        committed) in a thread of its own, started by the backup's commit
        (before it lets the device go) so that the backup answers without
        waiting for it; the device's next backup, and its close, wait for it.

        Removing a snapshot is a monitor's round (45-55 ms on the suite's
        cluster, up to a second on a busy one): a third of what an
        incremental of 1 % took through the mount, with the backup already
        durable. ``work`` reports its own failures (a snapshot left is
        removed by the next backup's tidy); anything else it raises is
        logged, never lost in a thread.
        """
        self.settle()

        def run() -> None:
            try:
                work()
            except BaseException:  # noqa: BLE001 - a thread's end: say it, do not vanish
                log.exception("device %s: removing older RBD snapshots failed", self.name)

        thread = threading.Thread(target=run, name=f"backupfs-rbd-tidy-{self.name}", daemon=True)
        try:
            with no_stops_in_new_threads():  # a Ctrl-C is the main thread's (engine/stopsignals.py)
                thread.start()
        except RuntimeError:
            # No thread to be had (a process at its limit): the backup is
            # committed all the same, and called from its commit this must
            # not fail it; the next backup's tidy removes what stays.
            log.warning("device %s: older RBD snapshots left for the next backup to remove (no thread)",
                        self.name)
            return
        self._after = thread

    def settle(self) -> None:
        """Wait for what ``after_backup`` started (bounded: each cluster call times out).

        A stop (Ctrl-C, the CLI's SIGTERM) is held back during the wait and
        raised after it: raised in the middle, the wait ended with the
        removal still running, and the close that waited went on (or the
        repository's, after the stop) to close the image, the connection
        and the catalog under it. The thread is forgotten only once done.
        """
        thread = self._after
        if thread is None:
            return
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            thread.join()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if self._after is thread:
            self._after = None

    def rebind(self, identity: SourceId) -> None:
        raise DeviceError(f"device {self.name}: an RBD source is not rebound by a restore", errno.EINVAL)

    def overwritten(self, reason: str) -> None:
        self.distrust(reason)
        self._persist(in_use=True)

    def identity(self) -> SourceIdentity:
        """An image has no inode or time to compare: its id is checked at every open instead."""
        return SourceIdentity(self.size, 0, 0, 0)

    def _noticed_outside_write(self, st: object, racing: bool = False, begin: bool = False) -> bool:
        # Other clients' writes are RBD's diff's to report, not a reason to scan.
        if begin:
            self.io.begin_write()
        return False

    # -- I/O ------------------------------------------------------------------------------

    def read(self, offset: int, length: int, nowait: bool = False,
             into: bytearray | None = None) -> bytes | bytearray:
        if offset >= self.size or length <= 0:
            return b""
        if nowait:
            raise WouldBlock()  # a network round trip: never on the event loop
        length = min(length, self.size - offset)
        try:
            return self._image().read(offset, length)
        except CephError as e:
            raise DeviceError(f"device {self.name}: {e}", e.errno or errno.EIO) from None

    def write(self, offset: int, data: bytes | bytearray | memoryview, nowait: bool = False,
              timed: object = None) -> int:
        """Write through to the image, marking the bitmaps first (a failed
        write may still have changed bytes). No copy-before-write: a running
        backup reads its snapshot, which this write does not touch."""
        if nowait:
            raise WouldBlock()
        if self.read_only:
            raise DeviceError(f"device {self.name}: source {self.spec.source} is read-only", errno.EROFS)
        if offset >= self.size:
            raise DeviceError(f"device {self.name}: write at {offset} is past its end ({self.size})", errno.ENOSPC)
        view = memoryview(data)[: self.size - offset]
        length = len(view)
        with self.gate.shared():
            self.io.mark(offset, length)
            try:
                self._image().write(offset, view)
            except CephError as e:
                raise DeviceError(f"device {self.name}: {e}", e.errno or errno.EIO) from None
        return length

    def fsync(self) -> None:
        try:
            self._image().flush()
        except CephError as e:
            raise DeviceError(f"device {self.name}: {e}", e.errno or errno.EIO) from None

    def close(self) -> None:
        """Clean stop: flush the image, persist the bitmaps as not in use, disconnect."""
        self.settle()
        if self.image is None:
            return
        if self.job is not None:
            self.job.cancel("the device is being closed")
        try:
            try:
                self.image.flush()
            except CephError:
                pass  # the bitmaps are saved regardless: they hold what was written
            self._persist(in_use=False)
        finally:
            self._close_source()


def probe_rbd(source: str, conf: str | None, client: str | None) -> tuple[RbdSpec, int, SourceId]:
    """(spec, size, identity) of an RBD image to bind a device to: it must
    exist and be reachable now (errors are one line: engine/ceph.py)."""
    from engine.ceph import parse

    spec = parse(source, conf, client)
    with Cluster(spec) as cluster:
        image = RbdImage(cluster, read_only=True)
        try:
            return spec, image.size(), rbd_identity(cluster, image)
        finally:
            image.close()
