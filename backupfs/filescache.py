"""Open guest disks (engine/guest/guestdisk.py) of the mount, shared and dropped when idle.

A backup's files are parsed when its ``files/<id>`` directory is first
used; what was parsed (volumes, listings) stays while it is used and a
while after, for at most ``KEEP`` backups. Every use holds the disk
(``using`` for a request, ``acquire``/``release`` for an open file): a
disk is closed only when no one holds it, so a reader never finds its
view's descriptors closed under it. Used from worker threads: guarded by
``_lock``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from backupfs.views import ViewCache
from engine.catalog import BackupRecord
from engine.guest.guestdisk import GuestDisk

log = logging.getLogger("backupfs.fs")

KEEP = 4  # backups whose parsed files stay after their last use
IDLE_SECONDS = 600.0  # ...for this long at most


@dataclass
class _Open:
    disk: GuestDisk
    uses: int = 0
    last_used: float = 0.0


class FilesCache:
    def __init__(self, views: ViewCache, keep: int = KEEP, idle_seconds: float = IDLE_SECONDS) -> None:
        self.views = views
        self.keep = keep
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        # Disks dropped (a prune, an unmount) while in use, by id(disk):
        # closed when their last use ends. Apart from ``_open``, as the
        # backup may be opened again (a new disk) before that.
        self._retired: dict[int, _Open] = {}

    def acquire(self, rec: BackupRecord) -> GuestDisk:
        """The backup's guest disk, opened if needed (blocks: call it in a
        worker). Each acquire needs one release."""
        with self._lock:
            found = self._open.get(rec.id)
            if found is not None:
                found.uses += 1
                found.last_used = time.monotonic()
                return found.disk
        view = self.views.acquire(rec)
        disk = GuestDisk(view, on_close=lambda: self.views.release(rec.id), name=rec.id)
        with self._lock:
            found = self._open.get(rec.id)
            if found is not None:  # another request opened it meanwhile
                found.uses += 1
                winner, disk = found.disk, disk
            else:
                self._open[rec.id] = _Open(disk, 1, time.monotonic())
                winner = disk
                disk = None  # type: ignore[assignment]
        if disk is not None:
            disk.close()
        self._evict()
        return winner

    def release(self, backup_id: str, disk: GuestDisk) -> None:
        """End one use of ``disk``."""
        with self._lock:
            found = self._open.get(backup_id)
            if found is not None and found.disk is disk:
                found.uses -= 1
                found.last_used = time.monotonic()
                return
            retired = self._retired.get(id(disk))
            if retired is None or retired.disk is not disk:
                return
            retired.uses -= 1
            if retired.uses > 0:
                return
            del self._retired[id(disk)]
        disk.close()

    @contextmanager
    def using(self, rec: BackupRecord) -> Iterator[GuestDisk]:
        disk = self.acquire(rec)
        try:
            yield disk
        finally:
            self.release(rec.id, disk)

    def evict_idle(self) -> None:
        """What the mount runs every minute: the idle disks past their time go."""
        self._evict()

    @contextmanager
    def using_open(self, backup_id: str) -> Iterator[GuestDisk | None]:
        """The backup's disk if it is open (not retired by a prune), held for the block;
        None otherwise (the caller then looks up the record and calls
        ``using``). Describing a listing asks for the disk once per entry:
        this spares each of them a catalog query. A pruned backup's disk is
        retired or closed (``drop_all``), so it is never handed out here."""
        with self._lock:
            found = self._open.get(backup_id)
            disk = None if found is None else found.disk  # a retired disk is never in _open
            if found is not None and disk is not None:
                found.uses += 1
                found.last_used = time.monotonic()
        if disk is None:
            yield None
            return
        try:
            yield disk
        finally:
            self.release(backup_id, disk)

    def _evict(self) -> None:
        """Close the idle disks beyond ``keep``, and those idle too long."""
        now = time.monotonic()
        to_close = []
        with self._lock:
            idle = sorted((o.last_used, bid) for bid, o in self._open.items() if o.uses <= 0)
            excess = len(self._open) - self.keep
            for last_used, bid in idle:
                if excess > 0 or now - last_used > self.idle_seconds:
                    to_close.append(self._open.pop(bid).disk)
                    excess -= 1
        for disk in to_close:
            disk.close()

    def open_ids(self) -> list[str]:
        """The backups with a disk open: kept, in use, or dropped and still in use."""
        with self._lock:
            return list(self._open) + [o.disk.name for o in self._retired.values()]

    def drop_all(self) -> None:
        """After a prune, and at unmount: close what no one holds, and the
        rest when their last use ends."""
        to_close = []
        with self._lock:
            for bid, o in list(self._open.items()):
                del self._open[bid]
                if o.uses <= 0:
                    to_close.append(o.disk)
                else:
                    self._retired[id(o.disk)] = o
        for disk in to_close:
            disk.close()
