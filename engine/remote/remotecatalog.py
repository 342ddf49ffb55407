"""A remote's catalog, read from the bucket or from a copy of its prefix on disk.

The newest catalog snapshot that parses and says it is complete is the
catalog (engine/remote/layout.py); an older one is used only when every
newer one is unreadable. ``RemoteCatalog`` answers the questions `list`
asks of a local catalog (devices, backups, lineage), read-only; a chain is
built from its lineage and object keys, never from backing names.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable

from engine.catalog import BackupRecord, DeviceRecord
from engine.errors import BackupfsError
from engine.remote.layout import (CATALOG_DIR, CATALOG_KEY_RE, FORMAT, FORMAT_KEY, MAX_CATALOG_BYTES,
                                  RemoteBackup, RemoteFormatError, Snapshot, catalog_key, decode_snapshot)
from engine.remote.store import ObjectInfo, RemoteError, RemoteStore


def snapshot_numbers(keys: object) -> list[int]:
    """The catalog snapshot numbers among relative keys, newest first."""
    out = []
    for k in keys:  # type: ignore[attr-defined]
        m = CATALOG_KEY_RE.fullmatch(k)
        if m:
            out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def newest_snapshot(numbers: list[int], read: Callable[[int], bytes | None],
                    where: Callable[[int], str]) -> Snapshot | None:
    """The newest snapshot of ``numbers`` (newest first) that reads whole and parses."""
    first_problem: str | None = None
    for n in numbers:
        data = read(n)
        if data is None:
            continue
        try:
            snap = decode_snapshot(data, where(n))
        except RemoteFormatError as e:
            first_problem = first_problem or str(e)
            continue
        if snap.number != n:
            first_problem = first_problem or f"{where(n)}: says it is snapshot {snap.number}"
            continue
        return snap
    if first_problem:
        raise RemoteFormatError(f"no catalog snapshot can be read: {first_problem}")
    return None


def check_format(data: bytes | None, where: str) -> None:
    """The format object says a format this backupfs reads (a missing one: nothing pushed yet)."""
    if data is None:
        return
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RemoteFormatError(f"{where}: {FORMAT_KEY} is not JSON; not a backupfs remote") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else doc
        raise RemoteFormatError(f"{where}: remote format {found!r} is not one this backupfs reads ({FORMAT})")


class RemoteCatalog:
    """One catalog snapshot, as read-only answers (the shape `list` needs)."""

    def __init__(self, snapshot: Snapshot | None, where: str) -> None:
        self.where = where
        self.snapshot = snapshot
        self._devices = {d.name: d for d in snapshot.devices} if snapshot else {}
        self._backups = {b.record.id: b for b in snapshot.backups} if snapshot else {}

    def devices(self) -> list[DeviceRecord]:
        return sorted(self._devices.values(), key=lambda d: d.name)

    def device(self, name: str) -> DeviceRecord | None:
        return self._devices.get(name)

    def backups(self, device: str | None = None) -> list[BackupRecord]:
        rows = [b.record for b in self._backups.values() if device is None or b.record.device == device]
        return sorted(rows, key=lambda r: (r.device, r.seq))

    def backup(self, backup_id: str) -> BackupRecord | None:
        b = self._backups.get(backup_id)
        return b.record if b else None

    def entry(self, backup_id: str) -> RemoteBackup | None:
        """The backup with its objects (keys, sizes, checksums)."""
        return self._backups.get(backup_id)

    def lineage(self, backup_id: str) -> list[RemoteBackup]:
        """The backup and its ancestors, newest first: the chain, built from the catalog
        (the snapshot's decoder already refused loops and unknown parents)."""
        out = []
        current: str | None = backup_id
        while current is not None:
            b = self._backups.get(current)
            if b is None:
                raise RemoteFormatError(f"{self.where}: backup {current} is not in the catalog")
            out.append(b)
            current = b.record.parent
        return out

    def close(self) -> None:
        pass


def read_store_catalog(store: RemoteStore) -> tuple[RemoteCatalog, dict[str, ObjectInfo]]:
    """The remote's catalog and its listing (one listing of the prefix)."""
    listing = store.listing()
    check_format(store.get(FORMAT_KEY, limit=64 << 10) if FORMAT_KEY in listing else None, store.what)
    snap = newest_snapshot(snapshot_numbers(listing), lambda n: store.get(catalog_key(n), MAX_CATALOG_BYTES),
                           lambda n: f"{store.what}: {catalog_key(n)}")
    if snap is None and FORMAT_KEY not in listing:
        raise RemoteError(f"{store.what}: nothing was pushed there (no {FORMAT_KEY})", errno.ENOENT)
    return RemoteCatalog(snap, store.what), listing


def _read_file(root: str, rel: str, limit: int) -> bytes | None:
    """A file of a copied remote, never through a symlink, at most ``limit`` bytes."""
    path = os.path.join(root, rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BackupfsError(f"{path}: cannot read it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BackupfsError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise RemoteFormatError(f"{path}: larger than {limit} bytes; not a backupfs catalog snapshot")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def is_copied_remote(path: str) -> bool:
    """A directory made by copying a remote's prefix (catalog snapshots, no catalog.db)."""
    return (not os.path.lexists(os.path.join(path, "catalog.db"))
            and os.path.isdir(os.path.join(path, CATALOG_DIR))
            and not os.path.islink(os.path.join(path, CATALOG_DIR)))


def read_dir_catalog(path: str) -> RemoteCatalog:
    """The catalog of a copy of a remote's prefix (`aws s3 sync` to a disk): read-only."""
    path = os.path.abspath(path)
    check_format(_read_file(path, FORMAT_KEY, 64 << 10), path)
    try:
        names = [f"{CATALOG_DIR}/{n}" for n in os.listdir(os.path.join(path, CATALOG_DIR))]
    except OSError as e:
        raise BackupfsError(f"{path}/{CATALOG_DIR}: cannot list it: {e.strerror}") from None
    snap = newest_snapshot(snapshot_numbers(names), lambda n: _read_file(path, catalog_key(n), MAX_CATALOG_BYTES),
                           lambda n: os.path.join(path, catalog_key(n)))
    if snap is None:
        raise RemoteFormatError(f"{path}: holds no catalog snapshot (catalog/NNNNNNNNNN.json)")
    return RemoteCatalog(snap, path)
