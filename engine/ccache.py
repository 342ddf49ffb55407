"""Decompressed clusters of one chain view: a small cache, filled ahead.

A compressed cluster is read whole and decompressed whole, however little
of it a reader asks for, so the decompressed clusters are kept (a few MiB
per view, bounded in bytes). A sequential reader of a compressed backup
is limited by zstd, one cluster after the other on one core (~300 MB/s
here, where plain clusters come from the page cache at ~700 MB/s); so
once its reads are seen to follow each other, the clusters just ahead of
it are decompressed on two worker threads (zstandard releases the GIL)
while it copies out the ones it asked for. An entry is then a Future
until its cluster is ready: a reader that needs it waits for it rather
than decompressing it a second time, and one that must not wait (the
mount's inline path) is told it would block.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from engine.stopsignals import block_stops_in_this_thread

CACHE_BYTES = 12 * 1024 * 1024  # per view, decompressed (more only for MIN_ENTRIES huge clusters)
AHEAD_BYTES = 4 * 1024 * 1024  # decompressed ahead of a sequential reader
MIN_ENTRIES = 4  # kept whatever their size: a read spans a few clusters
WORKERS = 2

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    """The process's decompression threads, made when first needed."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="backupfs-unzstd",
                                       initializer=block_stops_in_this_thread)  # engine/stopsignals.py
        return _pool


Key = tuple[int, int]  # (layer depth, L2 descriptor)


class DecompressedClusters:
    """Clusters by key, decompressed by ``load(key)``; safe across threads."""

    def __init__(self, load: Callable[[Key], bytes], size_of: Callable[[Key], int]) -> None:
        """``size_of(key)``: the cluster size of the key's layer."""
        self._load = load
        self._size_of = size_of
        self._bytes = 0  # of the entries, done or under way
        self._entries: OrderedDict[Key, bytes | Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def ready(self, key: Key) -> bool:
        """Whether ``get(key)`` would return without decompressing or waiting."""
        with self._lock:
            entry = self._entries.get(key)
        return entry is not None and (not isinstance(entry, Future) or entry.done())

    def get(self, key: Key) -> bytes:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if isinstance(entry, Future):
            try:
                return entry.result()
            except Exception:  # noqa: BLE001 - decompressed again here, where the error is raised to the reader
                entry = None
        if entry is not None:
            return entry
        data = self._load(key)
        self._put(key, data)
        return data

    def prefetch(self, keys: list[Key]) -> None:
        """Start decompressing ``keys`` (those not cached) on the worker threads."""
        if not keys:
            return
        pool = _workers()
        with self._lock:
            if self._closed:
                return
            ahead = 0
            for key in keys:
                size = self._size_of(key)
                ahead += size
                if ahead > AHEAD_BYTES and ahead > size:
                    break  # never more than this ahead (but at least one cluster)
                if key not in self._entries:
                    self._entries[key] = pool.submit(self._load, key)
                    self._bytes += size
            self._evict()

    def _put(self, key: Key, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            if key not in self._entries:
                self._bytes += self._size_of(key)
            self._entries[key] = data
            self._entries.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        while self._bytes > CACHE_BYTES and len(self._entries) > MIN_ENTRIES:
            key, old = self._entries.popitem(last=False)
            self._bytes -= self._size_of(key)
            if isinstance(old, Future):
                old.cancel()  # not started yet: never will be; running: its result is dropped

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def memory_bytes(self) -> int:
        """What the cache holds now (an entry under way counted as a whole cluster)."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Drop everything: decompressions not started never start, those
        under way are waited for (they read the view's files, which the
        caller closes next, and a reused descriptor must not be read)."""
        with self._lock:
            self._closed = True
            futures = [e for e in self._entries.values() if isinstance(e, Future)]
            self._entries.clear()
            self._bytes = 0
        for fut in futures:
            if not fut.cancel():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - a view being closed: nobody wants it
                    pass
