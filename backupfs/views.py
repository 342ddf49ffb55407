"""Open chain views, shared between the readers of a backup and kept a while after.

Opening a backup builds its chain index and loads its checksums (seconds
on a big device), so one view serves every reader of a backup, and the
last few views stay open after their last reader left. Used from the
event loop (release), I/O workers (acquire) and the advisor thread
(release): everything here is guarded by ``_lock``
(developer-notes/concurrency.md).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from engine.catalog import BackupRecord
from engine.chain import ChainView
from engine.errors import ImageError
from engine.integrity import VerifiedView
from engine.repo import Repository

log = logging.getLogger("backupfs.fs")

BackupView = ChainView | VerifiedView  # checked reads when the backup has checksums

IDLE_CHAINS = 8  # chain views kept open after their last reader left
# ...and the memory they may keep: the chain index, and the checksums at
# 8 bytes per granule (128 MiB for a 1 TiB device at 64 KiB). The newest
# idle view stays whatever its size: reopening it costs seconds on a big
# device, and one view is bounded by its device.
IDLE_VIEW_BYTES = 512 * 1024 * 1024


class ViewCache:
    """Views in use with their use counts, and idle views, newest last.

    A view is closed only when no handle and no queued advice holds it.
    """

    def __init__(self, repo: Repository, idle_view_bytes: int = IDLE_VIEW_BYTES) -> None:
        self.repo = repo
        self.idle_view_bytes = idle_view_bytes
        self._views: dict[str, tuple[BackupView, int]] = {}  # backup id -> (view, open count)
        self._idle_views: OrderedDict[str, BackupView] = OrderedDict()
        self._views_lock = threading.Lock()
        # Open views whose images a prune removed or rewrote: closed, not
        # kept idle, when their last use ends (their files are deleted).
        self._stale_views: set[str] = set()

    def in_use(self) -> list[str]:
        """The backups whose views someone holds."""
        with self._views_lock:
            return list(self._views)

    def idle(self) -> list[str]:
        """The backups whose views are kept idle, oldest first."""
        with self._views_lock:
            return list(self._idle_views)

    def acquire(self, rec: BackupRecord) -> BackupView:
        """The backup's view, opened unless it is open or idle; blocks (call
        it in a worker). Each acquire needs one release."""
        with self._views_lock:
            entry = self._views.get(rec.id)
            if entry is not None:
                self._views[rec.id] = (entry[0], entry[1] + 1)
                return entry[0]
            view = self._idle_views.pop(rec.id, None)
        if view is None:
            try:
                view = self.repo.open_backup(rec.id)
            except ImageError as e:
                # A chain holds a descriptor per image: views kept open for
                # a later reader must not cost this one its open.
                if not e.out_of_resources or not self.close_idle():
                    raise
                log.info("out of descriptors opening %s: closed the idle chain views, trying again", rec.id)
                view = self.repo.open_backup(rec.id)
        return self.publish(rec.id, view)

    def publish(self, backup_id: str, view: BackupView) -> BackupView:
        """Register a view just opened with one use; if another opener won
        the race, close this one and use theirs."""
        with self._views_lock:
            entry = self._views.get(backup_id)
            if entry is not None:  # another opener won the race
                view.close()
                self._views[backup_id] = (entry[0], entry[1] + 1)
                return entry[0]
            self._views[backup_id] = (view, 1)
            return view

    def close_idle(self) -> int:
        """Close every view no reader holds; returns how many there were."""
        with self._views_lock:
            idle = list(self._idle_views.values())
            self._idle_views.clear()
        for v in idle:
            v.close()
        return len(idle)

    def retain(self, backup_id: str) -> BackupView | None:
        """One more use of an open view (a queued advice), or None if it is not open."""
        with self._views_lock:
            entry = self._views.get(backup_id)
            if entry is None:
                return None
            self._views[backup_id] = (entry[0], entry[1] + 1)
            return entry[0]

    def release(self, backup_id: str) -> None:
        """End one use; the last one keeps the view idle (or closes it if stale),
        and the oldest idle views beyond the count or memory budget are closed."""
        to_close = []
        with self._views_lock:
            view, count = self._views[backup_id]
            if count > 1:
                self._views[backup_id] = (view, count - 1)
                return
            del self._views[backup_id]
            if backup_id in self._stale_views:
                self._stale_views.discard(backup_id)
                to_close.append(view)
            else:
                if backup_id in self._idle_views:  # two opens raced: keep one
                    to_close.append(self._idle_views.pop(backup_id))
                self._idle_views[backup_id] = view
            idle_bytes = sum(v.memory_bytes() for v in self._idle_views.values())
            while len(self._idle_views) > IDLE_CHAINS or (
                len(self._idle_views) > 1 and idle_bytes > self.idle_view_bytes
            ):
                oldest = self._idle_views.popitem(last=False)[1]
                idle_bytes -= oldest.memory_bytes()
                to_close.append(oldest)
        for v in to_close:
            v.close()

    def drop_stale(self) -> None:
        """After a prune: close idle views, and views in use once their use ends
        (a reader, or advice still queued), so deleted images are let go."""
        with self._views_lock:
            self._stale_views.update(self._views)
        self.close_idle()

    def close_all(self) -> None:
        """At unmount, after the advisor is closed (its advice uses the views' files)."""
        with self._views_lock:
            views = [v for v, _ in self._views.values()] + list(self._idle_views.values())
            self._views.clear()
            self._idle_views.clear()
            self._stale_views.clear()
        for v in views:
            v.close()


def read_into(view: BackupView, off: int, size: int, into: memoryview) -> int:
    """Read up to ``size`` bytes of ``view`` at ``off`` into ``into`` (clipped at
    its end); the count. What a relay thread's backup read does, for the local
    mount's and the remote mount's alike."""
    wanted = max(0, min(size, view.size - off))
    target = into[:wanted]
    data = view.read(off, wanted, into=target)
    n = len(data)
    if data is not target and n:
        into[:n] = data
    return n
