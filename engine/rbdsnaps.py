"""The RBD snapshots an RBD device's backups take: one kept, none left stray.

A backup of an RBD image takes snapshot ``backupfs-<backup id>`` at its
trigger and reads it, so the image's own clients (the VM) run on at full
speed with nothing copied before they write. The next backup asks RBD
what changed since that snapshot. So exactly one is kept, the newest
backup's, and every other one goes:

- its row is recorded before the snapshot is made (an intent), so a
  process killed at any instant leaves a snapshot the next backup of the
  device finds and removes (``tidy``); a snapshot backupfs did not record
  is never touched, even one named like ours;
- the backup's own commit names its snapshot (engine/catalog.py), and only
  after that commit are the older ones removed (``keep_only``): a crash in
  between leaves two, and the next ``tidy`` removes the older;
- a failed or cancelled backup removes its own (``drop``).

The base of an incremental is the newest backup's snapshot, checked by name
and id: missing, or made anew under its name by someone else, it cannot say
what changed, and the backup compares checksums instead (a scan), as after
any change behind backupfs's back.
"""

from __future__ import annotations

import errno
import signal
from concurrent.futures import Future, ThreadPoolExecutor

from engine.catalog import BackupRecord, Catalog, CatalogError, DeviceRecord
from engine.ceph import CephError, Cluster, from_record
from engine.rbdimage import RbdImage, snapshot_name
from engine.stopsignals import STOP_SIGNALS, block_stops_in_this_thread


class RbdSnapshots:
    """The snapshots of one device's image that its backups took."""

    def __init__(self, catalog: Catalog, device: str, image: RbdImage) -> None:
        self.catalog = catalog
        self.device = device
        self.image = image

    def tidy(self, keep: str | None) -> list[str]:
        """Remove every recorded snapshot but the one of backup ``keep`` (the
        newest): a killed run's, or an older one a crash kept. What could
        not be removed, one line each; their rows stay for the next try.

        One that cannot go (an admin protected it to clone from it, the
        cluster refused) costs only itself: the others still go, and the
        backup that asked goes on (it never reads an old snapshot).
        """
        failed = []
        for row in self.catalog.rbd_snapshots(self.device):
            if keep is not None and row.backup == keep:
                continue
            try:
                self.image.remove_snapshot(row.name, row.snap_id)
            except CephError as e:
                failed.append(str(e))
                continue
            self.catalog.forget_rbd_snapshot(self.device, row.name)
        return failed

    def base(self, latest: BackupRecord | None, listed: dict[str, int] | None = None
             ) -> tuple[str | None, str | None]:
        """(snapshot to ask RBD what changed since, None) for a backup after
        ``latest``; (None, why not) when it cannot be used: a scan then.
        ``listed``: the image's snapshots, if just listed (else asked now)."""
        if latest is None:
            return None, "no backup to compare with"
        rows = [r for r in self.catalog.rbd_snapshots(self.device) if r.backup == latest.id]
        if not rows:
            return None, f"no RBD snapshot of {self.image.spec.source} was kept for backup {latest.id}"
        row = rows[-1]
        found = (self.image.snapshots() if listed is None else listed).get(row.name)
        if found is None:
            return None, f"its RBD snapshot {row.name} on {self.image.spec.source} is missing"
        if row.snap_id is not None and found != row.snap_id:
            return None, (f"its RBD snapshot {row.name} on {self.image.spec.source} was made again by someone "
                          "else (its id differs)")
        return row.name, None

    def begin(self, backup_id: str) -> Taking:
        """Start taking the snapshot of backup ``backup_id`` now, in a thread
        of its own (recorded first, in this one); ``Taking.wait`` for it.

        Taking it is a monitor's round: 45-60 ms here, against 8-12 ms for
        what a backup must also do meanwhile (check the image by its name,
        find the snapshot to diff from, load the chain's checksums), which
        so runs beside it instead of after.
        """
        name = snapshot_name(backup_id)
        self.catalog.rbd_snapshot_intent(self.device, name)
        return Taking(self, name)

    def taken(self, name: str, snap_id: int) -> None:
        """Snapshot ``name`` was made and has ``snap_id``: recorded without a
        flush (the backup's own commit flushes it). Lost in a crash, the row
        names it without its id, as between its intent and this: removed by
        name all the same."""
        try:
            self.catalog.rbd_snapshot_taken(self.device, name, snap_id, flush=False)
        except CatalogError:
            pass

    def drop(self, name: str, snap_id: int | None) -> bool:
        """A backup that did not happen: remove its snapshot, forget it.
        Whether that worked (if not, the next ``tidy`` tries again)."""
        try:
            self.image.remove_snapshot(name, snap_id)
            self.catalog.forget_rbd_snapshot(self.device, name)
        except (CephError, CatalogError):
            return False
        return True

    def keep_only(self, backup_id: str) -> bool:
        """The backup is committed: remove every other snapshot. Whether that worked."""
        try:
            return not self.tidy(backup_id)
        except (CephError, CatalogError):
            return False


def remove_rbd_snapshots(catalog: Catalog, rec: DeviceRecord) -> list[str]:
    """A device is being removed: remove the snapshots its backups took.
    What could not be removed (a cluster out of reach), in words: the
    device goes all the same, and the words say how to finish by hand."""
    rows = catalog.rbd_snapshots(rec.name)
    if not rows:
        return []
    try:
        spec = from_record(rec.source, rec.ceph)
        with Cluster(spec) as cluster:
            image = RbdImage(cluster)
            try:
                failed = RbdSnapshots(catalog, rec.name, image).tidy(None)
            finally:
                image.close()
    except (CephError, CatalogError) as e:
        names = ", ".join(r.name for r in rows)
        return [f"the RBD snapshots {names} of {rec.source} were not removed ({e}); "
                f"remove them with 'rbd snap rm'"]
    return [f"{why}; remove it with 'rbd snap rm' (after 'rbd snap unprotect' if protected)" for why in failed]


class Taking:
    """A snapshot being taken in a thread of its own (``RbdSnapshots.begin``).

    ``wait`` must be called, whatever happens meanwhile in the caller: only
    then is it known whether the snapshot exists (``made``), so that a
    backup that fails before it gets to use it removes it.
    """

    def __init__(self, snaps: RbdSnapshots, name: str) -> None:
        self.snaps = snaps
        self.name = name
        self.made = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backupfs-rbd-snap",
                                        initializer=block_stops_in_this_thread)
        try:
            self._future: Future[None] = self._pool.submit(snaps.image.create_snapshot, name)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    def wait(self) -> str:
        """The snapshot's name once it is made; CephError if it was not.

        A stop (Ctrl-C) is held back during the wait and raised after it:
        raised in the middle, no one would know whether the snapshot was
        made (the intent's row still leads the next tidy to it). One a
        user made under the name is never ours: EEXIST, and not recorded.
        """
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            error = self._future.exception()
            self._pool.shutdown(wait=True)
            # Known (and recorded) before the unmasking below, which is
            # where a held stop is raised.
            self.made = error is None
            not_ours = isinstance(error, CephError) and error.errno == errno.EEXIST
            if not_ours:
                # Someone else's (another repository on this image took the
                # same id, or a user): never ours to remove, so not recorded.
                self.snaps.catalog.forget_rbd_snapshot(self.snaps.device, self.name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if error is None:
            return self.name
        if not_ours:
            raise CephError(f"{self.snaps.image.spec.source}: a snapshot named {self.name} exists already, not "
                            "made by this repository (another repository backing up this image at the "
                            "same second?); try again", errno.EEXIST) from None
        raise error  # it may have been made: the row stays, and the next tidy removes it
