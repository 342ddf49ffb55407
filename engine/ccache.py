"""Decompressed clusters of one chain view: a small cache, filled ahead.

A compressed cluster is read whole and decompressed whole, however little
of it a reader asks for, so the decompressed clusters are kept (a few MiB
per view, bounded in bytes). A sequential reader of a compressed backup
is limited by zstd, one cluster after the other on one core (~300 MB/s
here, where plain clusters come from the page cache at ~700 MB/s); so
once its reads are seen to follow each other, the clusters just ahead of
it are decompressed on two worker threads (zstandard releases the GIL)
while it copies out the ones it asked for. An entry is under way (a
place in a batch, whose Future the workers complete) until its cluster
is ready: a reader that needs it waits for it rather than decompressing
it a second time, and one that must not wait (the mount's inline path)
is told it would block, and can wait for ``pending`` on its event loop
instead of a thread (backupfs/fs.py ``_read_backup``).
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
BATCH = 8  # clusters per worker task: one hand-off (a futex wake-up or two) per 512 KiB, not per cluster

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


class _Batch:
    """Clusters handed to one worker task, decompressed in order: one Future
    for all of them (a Future per cluster, with its Condition and lock, cost
    the event loop more than the hand-off it saved)."""

    __slots__ = ("future", "keys", "live")

    def __init__(self, keys: list[Key]) -> None:
        self.future: Future[list[bytes | None]] = Future()
        self.keys = keys
        self.live = len(keys)  # of its entries still in the cache: at 0 it is cancelled


Entry = bytes | tuple[_Batch, int]  # decompressed, or under way: (its batch, its place in it)


class DecompressedClusters:
    """Clusters by key, decompressed by ``load(key)``; safe across threads."""

    def __init__(self, load: Callable[[Key], bytes], size_of: Callable[[Key], int]) -> None:
        """``size_of(key)``: the cluster size of the key's layer."""
        self._load = load
        self._size_of = size_of
        self._bytes = 0  # of the entries, done or under way
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def ready(self, key: Key) -> bool:
        """Whether ``get(key)`` would return without decompressing or waiting."""
        with self._lock:
            entry = self._entries.get(key)
        return entry is not None and (isinstance(entry, bytes) or entry[0].future.done())

    def get(self, key: Key) -> bytes:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if isinstance(entry, tuple):
            batch, place = entry
            try:
                data = batch.future.result()[place]
            except Exception:  # noqa: BLE001 - cancelled: decompressed here
                data = None
            if data is None:  # failed in the worker: decompressed again here, where the error is raised to the reader
                entry = None
            else:
                self._promote(key, entry, data)
                return data
        if entry is not None:
            return entry
        data = self._load(key)
        self._put(key, data)
        return data

    def prefetch(self, keys: list[Key]) -> None:
        """Start decompressing ``keys`` (those not cached) on the worker threads."""
        if not keys:
            return
        with self._lock:
            if self._closed:
                return
            ahead = 0
            started: list[Key] = []
            for key in keys:
                size = self._size_of(key)
                ahead += size
                if ahead > AHEAD_BYTES and ahead > size:
                    break  # never more than this ahead (but at least one cluster)
                if key not in self._entries:
                    started.append(key)
            self._start(started)

    def pending(self, keys: list[Key]) -> list[Future[list[bytes | None]]]:
        """What a reader of ``keys`` can wait for, on an event loop, until
        each of them is ready: the decompressions under way among them, and
        those of the ones neither cached nor under way, started now."""
        out: dict[int, Future[list[bytes | None]]] = {}
        with self._lock:
            if self._closed:
                return []
            missing = [key for key in keys if key not in self._entries]
            self._start(missing)
            for key in keys:
                entry = self._entries.get(key)
                if isinstance(entry, tuple) and not entry[0].future.done():
                    out[id(entry[0])] = entry[0].future
        return list(out.values())

    def _start(self, keys: list[Key]) -> None:
        """Enter ``keys`` as under way and hand them to the workers, a few
        per task (under the lock). Each once: a cluster that a child with
        smaller clusters splits is two extents of one key, and entered twice
        it was counted twice, for good (the cache thought itself full)."""
        keys = [key for key in dict.fromkeys(keys) if key not in self._entries]
        if not keys:
            return
        pool = _workers()
        for s in range(0, len(keys), BATCH):
            batch = _Batch(keys[s : s + BATCH])
            for place, key in enumerate(batch.keys):
                self._entries[key] = (batch, place)
                self._bytes += self._size_of(key)
            pool.submit(self._run, batch)
        self._evict()

    def _run(self, batch: _Batch) -> None:
        """A worker's task: decompress ``batch`` in order (None where it failed:
        the reader that gets there decompresses it again and sees why)."""
        if not batch.future.set_running_or_notify_cancel():
            return  # all of it evicted (cancelled) before its turn
        out: list[bytes | None] = []
        for key in batch.keys:
            try:
                out.append(self._load(key))
            except Exception:  # noqa: BLE001 - raised to the reader that reaches it
                out.append(None)
        batch.future.set_result(out)

    def _promote(self, key: Key, entry: tuple[_Batch, int], data: bytes) -> None:
        """A cluster of a finished batch becomes a plain entry (the batch's list
        is dropped once none of its entries refers to it)."""
        with self._lock:
            if self._entries.get(key) is entry:
                self._entries[key] = data
                entry[0].live -= 1

    def _put(self, key: Key, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            old = self._entries.get(key)
            if old is None:
                self._bytes += self._size_of(key)
            elif isinstance(old, tuple):
                old[0].live -= 1
            self._entries[key] = data
            self._entries.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        while self._bytes > CACHE_BYTES and len(self._entries) > MIN_ENTRIES:
            key, old = self._entries.popitem(last=False)
            self._bytes -= self._size_of(key)
            if isinstance(old, tuple):
                batch = old[0]
                batch.live -= 1
                if batch.live == 0:
                    batch.future.cancel()  # not started yet: never will be; running: its result is dropped

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
            futures = {id(e[0]): e[0].future for e in self._entries.values() if isinstance(e, tuple)}
            self._entries.clear()
            self._bytes = 0
        for fut in futures.values():
            if not fut.cancel():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - a view being closed: nobody wants it
                    pass
