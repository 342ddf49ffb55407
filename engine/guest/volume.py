"""One guest filesystem, opened: paths to entries, listings, links, data, with bounds.

The parser objects of one volume are used by one thread at a time (its
lock): they seek and read a shared stream. A file's data, once its runs
are known, is read without the lock (engine/guest/guestfs.py FileData).

Every call runs under the request's work budget (engine/guest/reader.py)
and turns whatever the parser raises on a damaged or crafted filesystem
into ``GuestDamaged`` naming the volume and the path: the caller answers
EIO for that one request, and everything else keeps serving.

Listings are cached per directory, most recently used kept, up to
``CACHED_ENTRIES`` entries in all: a lookup needs its directory's listing
(the parsers have no name index), and a walk of a tree asks for every
name of a directory in turn. A listing that failed is remembered too: a
crafted directory may spend a whole request's work budget (seconds) before
it is refused, and every lookup of a name in it would spend it again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from engine.errors import BackupfsError
from engine.guest.guestfs import MAX_DIR_ENTRIES, FileData, GuestEntry, GuestFS, name_bytes
from engine.guest.reader import Budget, GuestDamaged
from engine.text import escape

log = logging.getLogger("backupfs.guest")

GuestPath = tuple[bytes, ...]  # names from the volume's root
CACHED_ENTRIES = 200_000  # ~120 MB at most; a directory larger than this is kept alone (the last one)
CACHED_REFUSALS = 1024  # directories remembered as unreadable (a crafted one may cost a whole request budget)
T = TypeVar("T")


def show_path(path: GuestPath) -> str:
    return escape("/".join(p.decode("utf-8", "surrogateescape") for p in path)) or "/"


class Volume:
    """A parsed filesystem of one backup. ``name`` is its directory's name (p1, disk, lvm-vg-lv)."""

    def __init__(self, name: str, fs: GuestFS, budget: Budget) -> None:
        self.name = name
        self.fs = fs
        self._budget = budget
        self._lock = threading.Lock()
        self._root = self._call("/", fs.root)
        self._listings: OrderedDict[GuestPath, dict[bytes, GuestEntry]] = OrderedDict()
        self._cached = 0
        self._refused: dict[GuestPath, str] = {}  # directories whose listing failed, and why
        # The last directory too big for the cache (over CACHED_ENTRIES): kept
        # alone, or every lookup in it (ls -l: one per entry) would list it again.
        self._big: tuple[GuestPath, dict[bytes, GuestEntry]] | None = None
        self._cache_lock = threading.Lock()  # the two caches: lookups run in several threads

    @property
    def kind(self) -> str:
        return self.fs.kind

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        with self._lock, self._budget.spend(f"{self.name}: {what}"):
            try:
                return fn(*args)
            except GuestDamaged as e:
                if str(e).startswith(f"{self.name}: "):
                    raise
                # raised inside an adapter (a bound of ext_runs, fs_btrfs, ...): say where
                raise GuestDamaged(f"{self.name}: {what}: {e}") from None
            except BackupfsError:
                raise
            except RecursionError:
                raise GuestDamaged(f"{self.name}: {what}: the filesystem's structures nest without end") from None
            except MemoryError:
                raise GuestDamaged(f"{self.name}: {what}: the filesystem's structures need too much memory") from None
            except Exception as e:  # the parser on a damaged guest: any exception at all
                raise GuestDamaged(f"{self.name}: {what}: damaged filesystem ({escape(type(e).__name__)}: "
                                   f"{escape(str(e))[:200]})") from None

    def run(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Call ``fn`` with the parser to itself, under a request's budget
        (what the history's fast paths use to read structures directly)."""
        return self._call(what, fn, *args)

    def entry(self, path: GuestPath) -> GuestEntry:
        """The entry at ``path``; FileNotFoundError if there is none."""
        if not path:
            return self._root
        found = self.listing(path[:-1]).get(path[-1])
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), show_path(path))
        return found

    def listing(self, path: GuestPath) -> dict[bytes, GuestEntry]:
        """A directory's entries by name; NotADirectoryError for anything else."""
        with self._cache_lock:
            cached = self._listings.get(path)
            if cached is None and self._big is not None and self._big[0] == path:
                return self._big[1]
            if cached is not None:
                self._listings.move_to_end(path)
                return cached
            refused = self._refused.get(path)
        if refused is not None:  # the same bytes give the same damage: not paid for twice
            raise GuestDamaged(refused)
        parent = self.entry(path)
        if not parent.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), show_path(path))
        try:
            listing = self._call(show_path(path), self._list, parent, path)
        except GuestDamaged as e:
            with self._cache_lock:
                if len(self._refused) >= CACHED_REFUSALS:
                    self._refused.pop(next(iter(self._refused)))
                self._refused[path] = str(e)
            raise
        with self._cache_lock:
            if len(listing) > CACHED_ENTRIES:
                self._big = (path, listing)
            if len(listing) <= CACHED_ENTRIES and path not in self._listings:
                self._listings[path] = listing
                self._cached += len(listing)
                while self._cached > CACHED_ENTRIES and len(self._listings) > 1:
                    _, dropped = self._listings.popitem(last=False)
                    self._cached -= len(dropped)
        return listing

    def _list(self, parent: GuestEntry, path: GuestPath) -> dict[bytes, GuestEntry]:
        out: dict[bytes, GuestEntry] = {}
        skipped = 0
        for name, entry in self.fs.children(parent):
            raw = name_bytes(name)
            if raw is None or raw in out:
                skipped += 1
                continue
            out[raw] = entry
            if len(out) > MAX_DIR_ENTRIES:
                raise GuestDamaged(f"more than {MAX_DIR_ENTRIES} entries in one directory")
        if skipped:
            log.warning("%s: %s: left out %d entries whose names cannot be shown (empty, `/`, NUL, "
                        "duplicate)", self.name, show_path(path), skipped)
        return out

    def readlink(self, path: GuestPath) -> bytes:
        entry = self.entry(path)
        if not entry.is_link:
            raise GuestDamaged(f"{self.name}: {show_path(path)}: not a symlink")
        return self._call(show_path(path), self.fs.readlink, entry)

    def xattrs(self, path: GuestPath) -> dict[bytes, bytes]:
        entry = self.entry(path)
        return self._call(show_path(path), self.fs.xattrs, entry)

    def data(self, path: GuestPath) -> FileData:
        """A regular file's bytes: read them with ``read_data``."""
        entry = self.entry(path)
        if not entry.is_file:
            raise GuestDamaged(f"{self.name}: {show_path(path)}: not a regular file")
        return self._call(show_path(path), self.fs.data, entry)

    def read_data(self, data: FileData, offset: int, length: int) -> bytes:
        """Bytes of a file: straight from its runs, or under the lock through the parser."""
        with contextlib.nullcontext() if data.direct else self._lock:
            try:
                return data.read(offset, length)
            except BackupfsError:
                raise
            except Exception as e:
                raise GuestDamaged(f"{self.name}: reading a file: {escape(str(e))[:200]}") from None
