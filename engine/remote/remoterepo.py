"""A remote, read-only, with the face the mounted tree asks of a Repository.

`backupfs mount s3://BUCKET/PREFIX MOUNT` serves the same tree a local
mount does for backups (backupfs/tree.py): devices, their backups, the
newest, a backup opened for reading, and through it the files view and
the history (a backup's chain, for the tables two backups differ in). ``RemoteRepository`` answers
those from the catalog snapshot read at mount time (a later push is seen
after a remount) and opens a backup as a chain of its lineage's objects,
each read through the object cache (engine/remote/objcache.py) by ranged
GETs. Chains are built from the catalog's lineage and object keys, never
from the backing names inside the images (developer-notes/remote.md).
"""

from __future__ import annotations

import errno
import logging
import os

from engine.catalog import BackupRecord, DeviceRecord
from engine.chain import ChainView
from engine.checksums import ChecksumRecord, overlay
from engine.fsutil import atomic_write
from engine.integrity import VerifiedView
from engine.errors import BackupfsError, ErrnoError
from engine.qcow2.layers import Layer, Qcow2Layer
from engine.remote.fetch import check_object
from engine.remote.layout import RemoteObject
from engine.remote.objcache import CachedObject, ObjectCache
from engine.remote.remotecatalog import RemoteCatalog
from engine.remote.store import ObjectInfo, RemoteStore
from engine.text import escape

log = logging.getLogger("backupfs.remote")

class RemoteRepository:
    """Devices, backups and chains of one remote, as a mount needs them."""

    def __init__(self, store: RemoteStore, catalog: RemoteCatalog, listing: dict[str, ObjectInfo],
                 cache: ObjectCache) -> None:
        self.store = store
        self.catalog = catalog
        self.cache = cache
        self.path = cache.directory  # statfs reports the cache's disk
        self.url = store.location.url
        self._listing = listing

    # -- what the tree asks ----------------------------------------------------------

    def devices(self) -> list[DeviceRecord]:
        return self.catalog.devices()

    def device_record(self, name: str) -> DeviceRecord | None:
        return self.catalog.device(name)

    def backups(self, device: str) -> list[BackupRecord]:
        return self.catalog.backups(device)

    def backup_record(self, backup_id: str) -> BackupRecord | None:
        return self.catalog.backup(backup_id)

    def latest_backup(self, device: str) -> BackupRecord | None:
        rows = self.catalog.backups(device)
        return rows[-1] if rows else None

    def device(self, name: str) -> object:
        raise ErrnoError(f"{self.url}: device {name} has no live disk on a remote", errno.ENOENT)

    # -- reading ---------------------------------------------------------------------

    def _cached(self, obj: RemoteObject) -> CachedObject:
        """The object through the cache, if the remote still holds it as the catalog
        says (its size in the listing made at mount time; its ETag guards every GET)."""
        found = self._listing.get(obj.key)
        if found is None:
            raise ErrnoError(f"{self.url}: {obj.key} is missing (the catalog names it)", errno.EIO)
        if found.size != obj.size:
            raise ErrnoError(f"{self.url}: {obj.key} holds {found.size} bytes, the catalog records {obj.size}",
                             errno.EIO)
        return self.cache.open(obj, found.etag)

    def open_backup(self, backup_id: str) -> ChainView | VerifiedView:
        """The backup as one chain of its lineage's objects, tip first, read by ranged GETs,
        checked against the lineage's checksum files."""
        view = self.chain(backup_id)
        try:
            return self._verified(view, backup_id)
        except BaseException:
            view.close()
            raise

    def chain(self, backup_id: str) -> ChainView:
        """The backup's chain, unchecked: what the history (engine/history/history.py)
        asks of a repository to compare two backups' tables (no data read)."""
        if self.catalog.backup(backup_id) is None:
            raise ErrnoError(f"{self.url}: no backup {backup_id!r}", errno.ENOENT)
        layers: list[Layer] = []
        try:
            for entry in self.catalog.lineage(backup_id):
                img = entry.image
                cached = self._cached(img)
                fd = os.open(cached.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    layer = Qcow2Layer(cached.path, fd, prefetch=cached.ensure)
                except BackupfsError as e:
                    raise ErrnoError(f"{self.url}: {img.key}: {e}", e.errno or errno.EIO) from None
                layer.path = f"{self.url}/{img.key}"  # what errors and the log name
                layers.append(layer)
            return ChainView(layers)
        except BaseException:
            for layer in layers:
                layer.close()
            raise

    def _verified(self, view: ChainView, backup_id: str) -> ChainView | VerifiedView:
        """The view checked against its lineage's checksum files, as a local mount's
        reads are (a block damaged at the server, or on the cache's disk, is EIO, not
        wrong bytes); unchecked, and logged, when a backup of the lineage has none."""
        rec = self.catalog.backup(backup_id)
        assert rec is not None
        records = []
        for entry in reversed(self.catalog.lineage(backup_id)):
            if entry.checksums is None:
                self._as_recorded(backup_id)
                log.info("%s: backup %s has no checksum file: reads of %s are not checked", self.url,
                         entry.record.id, backup_id)
                return view
            records.append(ChecksumRecord.load(self._sums_file(entry.checksums)))
        hashes, defined = overlay(records)
        return VerifiedView(view, rec.id, rec.granularity, hashes, defined)

    def _as_recorded(self, backup_id: str) -> None:
        """Reads left unchecked block by block are at least of the objects the catalog
        records: each image's ETag in the mount's listing must be the catalog's (free;
        a snapshot of an earlier version records a sha256 instead, not comparable)."""
        for entry in self.catalog.lineage(backup_id):
            img = entry.image
            found = self._listing.get(img.key)
            if img.checksum.etag and found is not None and found.etag != img.checksum.etag:
                raise ErrnoError(f"{self.url}: {img.key} is not the object the catalog records (ETag "
                                 f"{escape(found.etag[:80])}, the catalog's {img.checksum.etag})", errno.EIO)

    def _sums_file(self, obj: RemoteObject) -> str:
        """A checksum object, downloaded whole (checked against the catalog's checksum)
        into the cache directory once; it never changes."""
        path = os.path.join(self.cache.directory, f"{obj.checksum.text}-{obj.size}.sums")
        if os.path.exists(path):
            return path
        data = self.store.get(obj.key, limit=max(obj.size, 1))
        if data is None:
            raise ErrnoError(f"{self.url}: {obj.key} is missing (the catalog names it)", errno.EIO)
        digest = obj.checksum.digest()
        digest.update(data)
        check_object(self.store.what, obj, len(data), digest)
        atomic_write(path, data)
        return path

    def close(self) -> None:
        self.cache.close()
