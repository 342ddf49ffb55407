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

from engine.catalog import BackupRecord, Catalog, CatalogError, DeviceRecord
from engine.ceph import CephError, Cluster, from_record
from engine.rbdimage import RbdImage, snapshot_name


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

    def base(self, latest: BackupRecord | None) -> tuple[str | None, str | None]:
        """(snapshot to ask RBD what changed since, None) for a backup after
        ``latest``; (None, why not) when it cannot be used: a scan then."""
        if latest is None:
            return None, "no backup to compare with"
        rows = [r for r in self.catalog.rbd_snapshots(self.device) if r.backup == latest.id]
        if not rows:
            return None, f"no RBD snapshot of {self.image.spec.source} was kept for backup {latest.id}"
        row = rows[-1]
        found = self.image.snapshots().get(row.name)
        if found is None:
            return None, f"its RBD snapshot {row.name} on {self.image.spec.source} is missing"
        if row.snap_id is not None and found != row.snap_id:
            return None, (f"its RBD snapshot {row.name} on {self.image.spec.source} was made again by someone "
                          "else (its id differs)")
        return row.name, None

    def take(self, backup_id: str) -> tuple[str, int]:
        """Take the snapshot of backup ``backup_id`` now: (name, id). Recorded first."""
        name = snapshot_name(backup_id)
        self.catalog.rbd_snapshot_intent(self.device, name)
        try:
            snap_id = self.image.create_snapshot(name)
        except CephError as e:
            if e.errno == errno.EEXIST:
                # Someone else's (another repository on this image took the
                # same id, or a user): never ours to remove, so not recorded.
                self.catalog.forget_rbd_snapshot(self.device, name)
                raise CephError(f"{self.image.spec.source}: a snapshot named {name} exists already, not "
                                "made by this repository (another repository backing up this image at the "
                                "same second?); try again", errno.EEXIST) from None
            raise  # it may have been made: the row stays, and the next tidy removes it
        try:
            self.catalog.rbd_snapshot_taken(self.device, name, snap_id)
        except CatalogError:
            pass  # the row names it without its id: removed by name, all the same
        return name, snap_id

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
