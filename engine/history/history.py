"""The repository's face for history: changes of a backup, diffs of any two, versions of a path.

Both faces use it: the mount (``changes/<id>``, ``versions/...``, with its
shared open guest disks) and the CLI (``backupfs diff``). Results are kept
per backup pair (``CACHED_PAIRS`` most recent, and no more than
``CACHED_CHANGES`` lines in all), so a second read of a ``changes`` file
costs nothing. The count of pairs alone did not bound the daemon: a diff
where every file of a 100,000-file volume changed is 100,000 lines (15 MB
of ``Change`` objects), and 32 of those were kept (470 MB; ten times that
for a million files). The newest result is kept whatever its size (it is
being served).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from engine.catalog import BackupRecord
from engine.chain import ChainView
from engine.errors import UsageError
from engine.guest.guestdisk import GuestDisk
from engine.guest.volume import GuestPath
from engine.history.blocks import Ranges, changed_ranges
from engine.history.changes import diff_disks
from engine.history.compare import Change
from engine.history.versions import Version, versions



class HistoryHost(Protocol):
    """What the history reads of a repository (engine/repo.py Repository is one);
    a protocol, so this module does not import the facade that builds it."""

    def backup_record(self, backup_id: str) -> BackupRecord | None: ...

    def backups(self, name: str | None = None) -> list[BackupRecord]: ...

    def chain(self, backup_id: str) -> ChainView: ...

    def open_files(self, backup_id: str) -> GuestDisk: ...

CACHED_PAIRS = 32
CACHED_CHANGES = 1_000_000  # lines kept over all cached pairs (about 150 MB)
OpenDisk = Callable[[BackupRecord], AbstractContextManager[GuestDisk]]


class History:
    def __init__(self, repo: HistoryHost, open_disk: OpenDisk | None = None,
                 cached_changes: int = CACHED_CHANGES) -> None:
        self.repo = repo
        self.cached_changes = cached_changes
        self._open_disk = open_disk or self._own_disk
        self._lock = threading.Lock()
        self._diffs: OrderedDict[tuple[str, str], list[Change]] = OrderedDict()
        self._blocks: OrderedDict[tuple[str, str], Ranges] = OrderedDict()
        self._computing: dict[tuple[str, str], threading.Lock] = {}  # pairs being compared now

    @contextmanager
    def _own_disk(self, rec: BackupRecord) -> Iterator[GuestDisk]:
        with self.repo.open_files(rec.id) as disk:
            yield disk

    def _record(self, backup_id: str) -> BackupRecord:
        rec = self.repo.backup_record(backup_id)
        if rec is None:
            raise UsageError(f"no backup {backup_id!r}")
        return rec

    def blocks(self, old: BackupRecord, new: BackupRecord) -> Ranges:
        """The disk byte ranges where the two may differ (no data read)."""
        key = (old.id, new.id)
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        with self.repo.chain(old.id) as a, self.repo.chain(new.id) as b:
            ranges = changed_ranges(a, b)
        with self._lock:
            self._blocks[key] = ranges
            while len(self._blocks) > CACHED_PAIRS * 4:
                self._blocks.popitem(last=False)
        return ranges

    def diff(self, old: BackupRecord, new: BackupRecord) -> list[Change]:
        """What changed from ``old`` to ``new`` (any two backups of one device)."""
        if old.device != new.device:
            raise UsageError(f"{old.id} and {new.id} are backups of different devices")
        key = (old.id, new.id)
        with self._lock:
            if key in self._diffs:
                self._diffs.move_to_end(key)
                return self._diffs[key]
            gate = self._computing.setdefault(key, threading.Lock())
        # One comparison a pair at a time: two readers of one changes file opened together
        # (a whole-volume rewrite: 14 s and 100 MB each) wait for the first, not do it again.
        with gate:
            try:
                with self._lock:
                    if key in self._diffs:
                        self._diffs.move_to_end(key)
                        return self._diffs[key]
                return self._compute(key, old, new)
            finally:
                with self._lock:
                    if self._computing.get(key) is gate:
                        del self._computing[key]

    def _compute(self, key: tuple[str, str], old: BackupRecord, new: BackupRecord) -> list[Change]:
        changed = self.blocks(old, new)
        if not changed:
            found: list[Change] = []
        else:
            with self._open_disk(old) as a, self._open_disk(new) as b:
                found = diff_disks(a, b, changed)
        with self._lock:
            self._diffs[key] = found
            self._diffs.move_to_end(key)
            held = sum(len(v) for v in self._diffs.values())
            while len(self._diffs) > 1 and (len(self._diffs) > CACHED_PAIRS or held > self.cached_changes):
                held -= len(self._diffs.popitem(last=False)[1])
        return found

    def held(self) -> int:
        """How many change lines the cache holds (what bounds its memory)."""
        with self._lock:
            return sum(len(v) for v in self._diffs.values())

    def changes(self, rec: BackupRecord) -> list[Change]:
        """What changed between a backup's parent and it; nothing for a full backup."""
        if rec.parent is None:
            return []
        return self.diff(self._record(rec.parent), rec)

    def versions(self, device: str, volume: str, path: GuestPath) -> list[Version]:
        """The distinct versions of a regular file, oldest first."""
        return list(versions(self.repo.backups(device), volume, path, self._open_disk, self.blocks))

    def forget(self) -> None:
        """After a prune: pairs of removed or rewritten backups must not be reused."""
        with self._lock:
            self._diffs.clear()
            self._blocks.clear()
