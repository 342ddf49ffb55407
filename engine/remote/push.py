"""`backupfs push`: send a remote what it lacks, then a new catalog snapshot.

Order, so that the newest complete catalog on the remote only ever names
objects that exist, and every chain it names is whole:

1. take the remote's lock (engine/remote/lock.py); list the prefix once;
   read the newest catalog snapshot;
2. upload, device by device and within a device by catalog sequence (a
   parent before its children), every image and checksum file the remote
   lacks: a backup the remote holds with the same parent, kind and sizes is
   current; a backup a local prune rewrote (its parent changed) is sent under
   a new key ``<id>.r<N>`` beside the old object; an object a killed push
   left (at the key it would get, the same size and ETag as the local file)
   is taken as sent;
3. write catalog snapshot N+1 (write-once), naming the new keys;
4. only then delete every object of our key form (``devices/<dev>/<id>[.r<N>]
   .qcow2|.sums``) the new catalog does not name -- what older catalogs
   named, and what a killed push uploaded for a backup pruned here since --
   and catalog snapshots older than the last KEEP_SNAPSHOTS.

Nothing changed since the last push: no upload and no new snapshot.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.access import notices
from engine.catalog import BackupRecord, Catalog, DeviceRecord
from engine.errors import UsageError
from engine.job import Progress
from engine.remote.layout import (FORMAT, FORMAT_KEY, KEEP_SNAPSHOTS, MAX_CATALOG_BYTES, MAX_SNAPSHOT_NUMBER,
                                  RemoteBackup, RemoteObject, Snapshot, catalog_key, object_keys, object_owner)
from engine.remote.localread import close_all, file_size, open_backup, still_same
from engine.remote.location import RemoteSpec
from engine.remote.lock import RemoteLock
from engine.remote.remotecatalog import check_format, newest_snapshot, snapshot_numbers
from engine.remote.digest import Checksum
from engine.remote.store import READ_TIMEOUT, ObjectInfo, RemoteError, RemoteStore, env_read_timeout, local_checksum

MAX_REVISIONS = 1000


@dataclass
class PushResult:
    uploaded: int = 0  # objects sent
    bytes_sent: int = 0
    resumed: int = 0  # objects a killed push had sent, found whole and not sent again
    current: int = 0  # backups the remote already held as they are
    deleted: int = 0  # objects the remote no longer needed
    snapshot: int | None = None  # the catalog snapshot written, None: nothing changed
    backups: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        what = (f"catalog snapshot {self.snapshot}" if self.snapshot is not None
                else "the remote's catalog was current")
        return (f"pushed to {name}: {self.backups} backups, {self.uploaded} objects uploaded "
                f"({self.bytes_sent} bytes), {self.resumed} found from an interrupted push, "
                f"{self.current} backups already current, {self.deleted} objects deleted; {what}")


def store_for(spec: RemoteSpec) -> RemoteStore:
    """The bucket of a recorded remote, named in errors by the remote's name and URL."""
    return RemoteStore(f"remote {spec.name} ({spec.url})", spec.location, spec.endpoint, spec.region,
                       read_timeout=env_read_timeout(READ_TIMEOUT))


class Push:
    """One push of ``catalog``'s repository at ``root`` to ``store``."""

    def __init__(self, root: str, catalog: Catalog, store: RemoteStore, devices: list[str] | None,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.root = root
        self.catalog = catalog
        self.store = store
        self.on_progress = on_progress
        local = {d.name: d for d in catalog.devices()}
        for name in devices or []:
            if name not in local:
                raise UsageError(f"no device named {name!r} in the repository")
        self.device_names = sorted(set(devices)) if devices else sorted(local)
        self.filtered = bool(devices)
        self.local_devices: dict[str, DeviceRecord] = local
        self.result = PushResult()
        self._ids: dict[str, set[str]] = {}  # a device's local backup ids, read once
        self._progress = Progress(total=0, phase="pushing")
        self._progress_lock = threading.Lock()

    # -- progress ----------------------------------------------------------------------

    def _sent(self, n: int) -> None:
        with self._progress_lock:
            self._progress.done += n
            if self.on_progress:
                self.on_progress(self._progress)

    # -- the push ------------------------------------------------------------------------

    def run(self) -> PushResult:
        store = self.store
        store.check_bucket()
        origin = self.catalog.origin()
        found = store.get(FORMAT_KEY, limit=64 << 10)
        check_format(found, store.what)
        if found is None:
            store.put_new(FORMAT_KEY, (json.dumps({"format": FORMAT, "origin": origin}) + "\n").encode())
        else:
            theirs = json.loads(found).get("origin")
            if theirs is not None and theirs != origin:
                raise RemoteError(f"{store.what} holds the backups of another repository (its first push came "
                                  "from elsewhere); a push from this one would delete them: push to another "
                                  "prefix", errno.EEXIST)
        lock = RemoteLock(store)
        lock.acquire()
        try:
            self._run_locked(lock)
        except BaseException:
            try:
                if store.unreachable:  # cut off: the next push takes the lock over
                    lock.abandon()
                else:
                    lock.release()
            except Exception:
                pass  # the push's own error is the one to tell; a killed lock times out
            raise
        try:
            lock.release()
        except RemoteError as e:  # the push itself is done and durable
            notices.warning("%s; the lock stays until its lease runs out (or a push from this host "
                            "takes it over)", e)
        return self.result

    def _run_locked(self, lock: RemoteLock) -> None:
        store = self.store
        store.abort_stale_uploads()
        listing = store.listing()
        numbers = snapshot_numbers(listing)
        if numbers and numbers[0] >= MAX_SNAPSHOT_NUMBER:  # refused before anything is sent or deleted
            raise RemoteError(f"{store.what}: {catalog_key(numbers[0])} is the last catalog snapshot number (the "
                              "next key would be one no reader lists); if no push of this repository wrote it, "
                              "delete it from the remote by hand")
        prev = newest_snapshot(numbers, lambda n: store.get(catalog_key(n), MAX_CATALOG_BYTES),
                               lambda n: f"{store.what}: {catalog_key(n)}")
        prev_by_id = {b.record.id: b for b in prev.backups} if prev else {}
        if self.catalog.pending_removals():
            raise UsageError("a prune of the repository is half done; let it finish (open the repository "
                             "with any command that writes, e.g. a backup) and push again")
        records = [r for name in self.device_names for r in self.catalog.backups(name)]
        self.result.backups = len(records)
        plan: list[tuple[BackupRecord, RemoteBackup | None]] = []
        todo_bytes = 0
        for rec in records:
            kept = prev_by_id.get(rec.id)
            if kept is not None and self._current(rec, kept, listing):
                plan.append((rec, kept))
                self.result.current += 1
            else:
                plan.append((rec, None))
                todo_bytes += sum(file_size(self.root, r) for r in (rec.image, rec.checksums) if r)
        self._progress.total = todo_bytes
        entries: list[RemoteBackup] = []
        for rec, kept in plan:
            lock.check()
            if kept is not None:
                entries.append(RemoteBackup(_with_keys(rec, kept.image, kept.checksums), kept.image, kept.checksums))
            else:
                entries.append(self._send(rec, listing, prev, lock))
        still_same(self.catalog, records)
        snap = self._snapshot(prev, entries, numbers)
        lock.check()
        if prev is not None and snap.content() == prev.content():
            new_keys = prev.keys()
        else:
            store.put_new(catalog_key(snap.number), snap.encode())
            self.result.snapshot = snap.number
            numbers = [snap.number] + numbers
            new_keys = snap.keys()
        # Only now, with the new catalog in place: every object of our form that it
        # does not name -- what the older catalogs named, and what a killed push
        # uploaded for a backup since pruned here (it would stay forever). Keys of
        # any other form are not ours (a user's file in the bucket stays).
        obsolete = sorted(k for k in listing if k not in new_keys and self._obsolete(k))
        # The snapshot the catalog is read from stays, even below KEEP_SNAPSHOTS newer
        # numbers that do not parse (with nothing new, no snapshot was written above them).
        current = self.result.snapshot if self.result.snapshot is not None else prev.number if prev else None
        old_snapshots = [catalog_key(n) for n in numbers[KEEP_SNAPSHOTS:] if n != current]
        if obsolete or old_snapshots:
            lock.check()
            store.delete(obsolete + old_snapshots)
            self.result.deleted = len(obsolete)

    def _obsolete(self, key: str) -> bool:
        """An object of our form the new catalog does not name may go, unless it is a
        killed push's upload of a backup this repository still has, on a device this
        push left out (DEVICE arguments): a later push of that device takes it as sent."""
        owner = object_owner(key)
        if owner is None:
            return False
        device, ident = owner
        if device in self.device_names or device not in self.local_devices:
            return True
        return ident not in self._local_ids(device)

    def _local_ids(self, device: str) -> set[str]:
        if device not in self._ids:
            self._ids[device] = {r.id for r in self.catalog.backups(device)}
        return self._ids[device]

    def _current(self, rec: BackupRecord, kept: RemoteBackup, listing: dict[str, ObjectInfo]) -> bool:
        """The remote holds this backup as it is here: same place in the chain, same sizes.

        A local prune rewrites a child's image under the same name, and always
        re-points the child to a new parent (or none): a changed parent or kind
        is a rewritten image."""
        r = kept.record
        if (r.parent, r.kind, r.device) != (rec.parent, rec.kind, rec.device):
            return False
        if kept.image.key not in listing or listing[kept.image.key].size != file_size(self.root, rec.image):
            return False
        if (kept.checksums is None) != (rec.checksums is None):
            return False
        if kept.checksums is not None and rec.checksums is not None and (
                kept.checksums.key not in listing
                or listing[kept.checksums.key].size != file_size(self.root, rec.checksums)):
            return False
        return True

    def _send(self, rec: BackupRecord, listing: dict[str, ObjectInfo], prev: Snapshot | None,
              lock: RemoteLock) -> RemoteBackup:
        """Upload the backup's files under the first revision whose keys are free or
        hold these very bytes (a killed push's); never over other bytes."""
        files = open_backup(self.root, self.catalog, rec)
        try:
            for revision in range(MAX_REVISIONS):
                keys = object_keys(rec.device, rec.id, revision)
                have: dict[str, Checksum] = {}  # key -> what a killed push left there
                for f, key in zip(files, keys):
                    found = listing.get(key)
                    if found is None:
                        continue
                    if found.size == f.size:
                        checksum = local_checksum(f.fd, f.size)
                        if checksum.etag == found.etag:
                            have[key] = checksum
                            continue
                    break  # other bytes hold this key: the next revision
                else:
                    sent: list[RemoteObject] = []
                    for f, key in zip(files, keys):
                        if key in have:
                            self.result.resumed += 1
                            self._sent(f.size)
                            sent.append(RemoteObject(key, f.size, have[key]))
                            continue
                        lock.check()
                        info, checksum = self.store.upload_fd(key, f.fd, f.size, self._sent, lock.check)
                        listing[key] = info
                        self.result.uploaded += 1
                        self.result.bytes_sent += f.size
                        sent.append(RemoteObject(key, f.size, checksum))
                    image = sent[0]
                    sums = sent[1] if len(sent) > 1 else None
                    return RemoteBackup(_with_keys(rec, image, sums), image, sums)
            raise UsageError(f"backup {rec.id}: {MAX_REVISIONS} revisions of it are on the remote already")
        finally:
            close_all(files)

    def _snapshot(self, prev: Snapshot | None, entries: list[RemoteBackup], numbers: list[int]) -> Snapshot:
        """The next snapshot: this push's devices as they are here; with devices named,
        the others as the remote had them."""
        pushed = set(self.device_names)
        devices = [self.local_devices[n] for n in self.device_names]
        backups = list(entries)
        if self.filtered and prev is not None:
            devices += [d for d in prev.devices if d.name not in pushed]
            backups += [b for b in prev.backups if b.record.device not in pushed]
        devices.sort(key=lambda d: d.name)
        backups.sort(key=lambda b: (b.record.device, b.record.seq))
        number = (max(numbers) if numbers else 0) + 1
        return Snapshot(number, devices, backups, time.time_ns())


def _with_keys(rec: BackupRecord, image: RemoteObject, sums: RemoteObject | None) -> BackupRecord:
    """The local record with the remote's object keys in its file fields."""
    from dataclasses import replace

    return replace(rec, image=image.key, checksums=sums.key if sums else None, state="complete")


def push(root: str, catalog: Catalog, spec: RemoteSpec, devices: list[str] | None = None,
         on_progress: Callable[[Progress], None] | None = None) -> PushResult:
    """Push the repository at ``root`` (its catalog open, locked or beside its owner) to ``spec``."""
    return Push(root, catalog, store_for(spec), devices, on_progress).run()

