"""Remote objects read by ranged GETs through a bounded cache on local disk.

A remote mount reads a backup's images where they are, a block at a time:
each object is a sparse local file (its own size, holes where nothing was
fetched) and a record of which aligned blocks are present. A read of
``[a, b)`` first makes its blocks present (``CachedObject.ensure``): the
missing ones are fetched with ranged GETs, several in flight on a small
thread pool (radosgw here: one stream of 1 MiB ranges ~214 MiB/s, 670-800
MiB/s with 4-8 in flight), and a sequential reader gets the blocks after
it fetched ahead. The chain then preads the local file as it would a
local image (engine/qcow2/layers.py ``Layer.prefetch``).

Objects are written once (developer-notes/remote.md), so a cached block
never goes stale; what could mix bytes is a remote rewritten by hand. So
each object's file is named by its key, size and the catalog's checksum, the
ETag the server gave at open is kept beside its blocks (another ETag: the blocks
are dropped), and every GET carries ``If-Match`` on that ETag (a rewrite
during the mount is a failed read, never a mixed one).

The size limit is hard: before a block is written, the least recently
used unpinned blocks are punched out (and their bits cleared first, so a
crash never leaves a bit over a hole). A block is pinned from ``ensure``
until its reader's ``release``: a block about to be read is never evicted.
The record of present blocks is saved (atomically, after an fdatasync of
the data) at close and every 30 s while blocks change; a crash loses at most
some present bits, which only means fetching those blocks again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import fcntl
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from engine.errors import BackupfsError, ErrnoError
from engine.fsutil import atomic_write
from engine.nowait import WouldBlock
from engine.remote.layout import RemoteObject
from engine.remote.store import RemoteError, RemoteStore

log = logging.getLogger("backupfs.remote")

BLOCK = 1 << 20  # the unit fetched, cached and evicted
GET_BYTES = 8 << 20  # one ranged GET fetches up to this many contiguous missing blocks
FETCHERS = 8  # GETs in flight
# How far a sequential reader is fetched ahead: FIRST_AHEAD blocks at first, doubled at
# each refill while it stays sequential, up to AHEAD_BLOCKS (and a quarter of the cache).
# Measured in one process over radosgw (512 MiB, 4 readers): a fixed 64 blocks read at
# 204-221 MiB/s, 128 at 284-303, 256 at 292-429, with the fetchers idle between refills;
# the ramp keeps a reader that stops early (a partition probe) from costing 256 MiB of GETs.
FIRST_AHEAD = 16
AHEAD_BLOCKS = 256
SEQUENTIAL_SLACK = 8 * BLOCK  # a read this near the last one's end is sequential
MIN_CACHE = 16 << 20
# Seconds between saves of an object's record while blocks change: a save
# fdatasyncs the object's file first, and every 256 blocks that cost a
# sequential reader a third of its speed (measured: 245 -> ~300+ MiB/s).
SAVE_SECONDS = 30.0
_OWN_DATA_RE = re.compile(r"[0-9a-f]{40}\.data")  # an object's file: the name open() gives it
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/backupfs, ~/.cache/backupfs, or /var/cache/backupfs for root."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(xdg, "backupfs")
    if os.geteuid() == 0:
        return "/var/cache/backupfs"
    return os.path.join(os.path.expanduser("~"), ".cache", "backupfs")


_libc: object = None


def _punch(fd: int, offset: int, length: int) -> None:
    """Free the bytes (fallocate PUNCH_HOLE). libc is loaded once: find_library runs
    ldconfig in a subprocess, and eviction punches under the cache's mutex."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc: ctypes.CDLL = _libc  # type: ignore[assignment]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset),
                      ctypes.c_int64(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class ObjectCache:
    """Every cached object of one cache directory, with one size limit and one LRU.

    Thread-safe: the mount's workers read through it at once. ``stats``
    counts GETs and bytes fetched, and hits (what tests and the log use).
    """

    def __init__(self, store: RemoteStore, directory: str, limit: int, fetchers: int = FETCHERS) -> None:
        if limit < MIN_CACHE:
            raise BackupfsError(f"cache_size {limit} is below the smallest cache ({MIN_CACHE >> 20} MiB)")
        self.store = store
        self.limit = limit
        self.directory = private_dir(directory)
        self._lock_fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise BackupfsError(f"{self.directory}: the cache is in use by another mount; give it its own "
                                "with -o cache=DIR") from None
        self._mutex = threading.Lock()
        # Signalled when a GET's reserved bytes land or are given back: a GET that finds
        # the cache full of other GETs' reservations waits for them, not fails.
        self._room = threading.Condition(self._mutex)
        self._lru: OrderedDict[tuple[str, int], None] = OrderedDict()  # (object name, block), oldest first
        self._pins: dict[tuple[str, int], int] = {}
        self._objects: dict[str, CachedObject] = {}
        self.used = 0  # bytes of present blocks, all objects
        self.reserved = 0  # bytes of GETs under way, counted against the limit before they land
        self._pool = ThreadPoolExecutor(fetchers, thread_name_prefix="s3-get")
        self.stats = {"gets": 0, "bytes": 0, "hits": 0}
        # Objects cached by earlier mounts and not opened by this one (maybe
        # gone from the remote since): counted against the limit, and the
        # first evicted, whole, oldest first.
        self._dormant: OrderedDict[str, int] = OrderedDict()
        self._find_dormant()

    def _find_dormant(self) -> None:
        found = []
        for entry in os.scandir(self.directory):
            # Only the cache's own files (open() names them): `-o cache=DIR` may be a
            # directory that holds other files, and eviction unlinks what is found here.
            if not _OWN_DATA_RE.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            found.append((st.st_mtime_ns, entry.name[:-len(".data")], st.st_blocks * 512))
        for _, name, used in sorted(found):
            self._dormant[name] = used
            self.used += used

    def open(self, obj: RemoteObject, etag: str) -> CachedObject:
        """The cached object for ``obj`` whose server ETag (seen at open) is ``etag``."""
        name = hashlib.sha256(f"{obj.key}\n{obj.size}\n{obj.checksum.text}".encode()).hexdigest()[:40]
        with self._mutex:
            self.used -= self._dormant.pop(name, 0)  # counted again by its blocks, below
            found = self._objects.get(name)
            if found is not None and found.etag == etag:
                found.users += 1
                return found
        cached = CachedObject(self, obj, name, etag)
        with self._mutex:
            found = self._objects.get(name)
            if found is not None and found.etag == etag:
                found.users += 1
                cached.drop_handle()
                return found
            self._objects[name] = cached
            for block in cached.present_blocks():
                self._lru[(name, block)] = None
                self.used += cached.block_len(block)
        self._shrink(0)  # a smaller limit than the last mount's
        return cached

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for cached in list(self._objects.values()):
            cached.save()
            cached.drop_handle()
        self._objects.clear()
        os.close(self._lock_fd)

    # -- the shared LRU ----------------------------------------------------------------

    def _touch(self, name: str, block: int) -> None:
        key = (name, block)
        if key in self._lru:
            self._lru.move_to_end(key)

    def _shrink(self, room: int) -> None:
        """Evict least recently used unpinned blocks until ``room`` more bytes fit, and
        reserve them (a GET under way counts against the limit before it lands).
        When what is left is pinned and other GETs' reservations, wait for those to
        land (each is bounded by the store's timeouts, and holds no pin): several
        sequential readers of a small cache each read ahead up to a quarter of it,
        and their reservations together had failed a reader with ENOSPC."""
        victims: list[tuple[CachedObject, int]] = []
        with self._mutex:
            while self.used + self.reserved + room > self.limit:
                if self._dormant:
                    name, size = self._dormant.popitem(last=False)
                    self.used -= size
                    for suffix in (".blocks", ".data"):  # the record first: never a record over no data
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.directory, name + suffix))
                    continue
                key = next((k for k in self._lru if k not in self._pins), None)
                if key is None and self.reserved > 0:
                    self._room.wait()
                    continue
                if key is None:
                    raise ErrnoError(f"{self.directory}: the cache ({self.limit} bytes) is full of blocks being "
                                     "read; mount with a larger cache_size", errno.ENOSPC)
                del self._lru[key]
                owner = self._objects[key[0]]
                self.used -= owner.block_len(key[1])
                owner.present[key[1]] = False  # the bit first: never a bit over a hole
                # The hole now, under the mutex: punched later, it could land after a GET
                # that fetched the block again had written it (a present block of zeros).
                owner.punch(key[1])
                victims.append((owner, key[1]))
            self.reserved += room
        for owner, _ in victims:
            owner._note_change()

    def _added(self, owner: CachedObject, block: int) -> None:
        with self._mutex:
            self._lru[(owner.name, block)] = None
            self.used += owner.block_len(block)
            self.reserved -= owner.block_len(block)
            self._room.notify_all()

    def _unreserve(self, room: int) -> None:
        with self._mutex:
            self.reserved -= room
            self._room.notify_all()

    def pin(self, name: str, blocks: range) -> None:
        with self._mutex:
            for b in blocks:
                self._pins[(name, b)] = self._pins.get((name, b), 0) + 1

    def unpin(self, name: str, blocks: range) -> None:
        with self._mutex:
            for b in blocks:
                key = (name, b)
                n = self._pins.get(key, 0) - 1
                if n > 0:
                    self._pins[key] = n
                else:
                    self._pins.pop(key, None)


def private_dir(path: str) -> str:
    """The cache directory, made private (0700) and owned by us."""
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise BackupfsError(f"{path}: the cache must be a directory")
    if st.st_uid != os.geteuid():
        raise BackupfsError(f"{path}: the cache directory belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class CachedObject:
    """One remote object as a sparse local file and its present blocks."""

    def __init__(self, cache: ObjectCache, obj: RemoteObject, name: str, etag: str) -> None:
        self.cache = cache
        self.obj = obj
        self.name = name
        self.etag = etag
        self.users = 1
        self.path = os.path.join(cache.directory, name + ".data")
        self._record = os.path.join(cache.directory, name + ".blocks")
        self.blocks = -(-obj.size // BLOCK)
        self.present = [False] * self.blocks
        self._inflight: dict[int, Future[None]] = {}
        self._mutex = threading.Lock()
        self._changed = 0
        self._saved = time.monotonic()
        self._seq_end = -(2 * BLOCK)  # no read yet: the first is not sequential
        self._ahead_to = 0
        self._window = FIRST_AHEAD
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self._load()
            os.ftruncate(self.fd, obj.size)
        except BaseException:
            os.close(self.fd)
            raise

    def _load(self) -> None:
        try:
            with open(self._record, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        head, _, bits = data.partition(b"\n")
        if head != self.etag.encode() or len(bits) != self.blocks:
            # Not ours (another ETag: a remote rewritten by hand) or unreadable: start empty.
            os.ftruncate(self.fd, 0)
            return
        present = [c == 0x31 for c in bits]
        # An eviction punches its hole at once but saves the record later: after a
        # crash between the two the record says present over a hole (zeros). A
        # block with no data in the file is not present, whatever the record says.
        data_blocks = _data_blocks(self.fd, self.blocks)
        if data_blocks is not None:
            present = [p and d for p, d in zip(present, data_blocks)]
        self.present = present

    def present_blocks(self) -> list[int]:
        return [i for i, p in enumerate(self.present) if p]

    def block_len(self, block: int) -> int:
        return min(BLOCK, self.obj.size - block * BLOCK)

    def punch(self, block: int) -> None:
        """Free an evicted block's bytes (its bit is clear already; the caller notes the change)."""
        try:
            _punch(self.fd, block * BLOCK, self.block_len(block))
        except OSError as e:  # the bit is clear: the block is fetched again if needed
            log.warning("%s: cannot free block %d of the cache: %s", self.path, block, e.strerror)

    def save(self) -> None:
        """The record of present blocks, after the data it describes is on disk."""
        if self.fd < 0:
            return
        os.fdatasync(self.fd)
        bits = bytes(0x31 if p else 0x30 for p in self.present)
        atomic_write(self._record, self.etag.encode() + b"\n" + bits)
        self._changed = 0
        self._saved = time.monotonic()

    def _note_change(self) -> None:
        self._changed += 1
        if time.monotonic() - self._saved >= SAVE_SECONDS:
            try:
                self.save()
            except OSError as e:
                log.warning("%s: cannot save the cache's record: %s", self._record, e.strerror)

    def drop_handle(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading -------------------------------------------------------------------------

    def ensure(self, offset: int, length: int, nowait: bool = False, ahead: bool = True) -> Callable[[], None]:
        """Make [offset, offset+length) present and pinned; returns the release.
        With ``nowait``, raise WouldBlock if any of it must be fetched first.
        ``ahead``: a read of the guest's data, which may be sequential (the
        layer's own reads of its header and tables pass False: their order
        says nothing of the reader's, and read-ahead at each open of a deep
        chain's layers would fetch megabytes nobody asked for)."""
        end = min(offset + length, self.obj.size)
        if end <= offset:
            return _nothing
        blocks = range(offset // BLOCK, (end - 1) // BLOCK + 1)
        cache = self.cache
        cache.pin(self.name, blocks)
        try:
            missing = [b for b in blocks if not self.present[b]]
            if missing and nowait:
                raise WouldBlock()
            if ahead:  # first: a sequential reader's missing blocks go in its large GETs
                self._read_ahead(offset, end)
            if missing:
                self._fetch(missing)
            else:
                with cache._mutex:
                    cache.stats["hits"] += 1
            with cache._mutex:
                for b in blocks:
                    cache._touch(self.name, b)
        except BaseException:
            cache.unpin(self.name, blocks)
            raise
        return lambda: cache.unpin(self.name, blocks)

    def _fetch(self, missing: list[int]) -> None:
        """Fetch the missing blocks (contiguous runs, up to GET_BYTES a GET) and wait."""
        waits: list[Future[None]] = []
        with self._mutex:
            todo = []
            for b in missing:
                f = self._inflight.get(b)
                if f is not None:
                    waits.append(f)
                elif not self.present[b]:
                    todo.append(b)
            for run in _runs(todo, GET_BYTES // BLOCK):
                f = self.cache._pool.submit(self._get, run)
                for b in run:
                    self._inflight[b] = f
                waits.append(f)
        # Each GET is bounded in all, not only by its timeouts (RemoteStore.answer_bound):
        # a trickled answer fails this read in time; its blocks stay in flight (no second
        # GET of them) until that GET ends.
        bound = self.cache.store.answer_bound(GET_BYTES)
        _, late = wait_futures(waits, timeout=bound)
        if late:
            raise RemoteError(f"{self.cache.store.what}: {self.obj.key}: no complete answer in {bound:.0f} s "
                              f"(bytes {missing[0] * BLOCK}-{(missing[-1] + 1) * BLOCK - 1})", errno.EIO)
        for f in waits:
            f.result()  # a RemoteError of the GET is this read's

    def _get(self, run: list[int]) -> None:
        first, last = run[0], run[-1]
        start = first * BLOCK
        length = (last - first) * BLOCK + self.block_len(last)
        landed = False
        try:
            self.cache._shrink(length)
        except BaseException:
            with self._mutex:
                for b in run:
                    self._inflight.pop(b, None)
            raise
        try:
            end = start + length
            reached = start  # how far its bytes have landed (a failed GET's are freed again)

            def land(at: int, piece: memoryview) -> None:
                nonlocal reached
                piece = piece[:max(0, end - at)]  # never past the run: its count is checked after
                try:
                    while piece:
                        n = os.pwrite(self.fd, piece, at)
                        piece, at = piece[n:], at + n
                        reached = max(reached, at)
                except OSError as e:  # the cache's disk, not the remote: said as such
                    raise ErrnoError(f"{self.path}: cannot write the cache: {e.strerror}", e.errno or errno.EIO) \
                        from None

            try:
                got = self.cache.store.get_range(self.obj.key, start, length, land, etag=self.etag)
            except RemoteError as e:  # the reader gets EIO; the log says what and where
                raise RemoteError(f"{e} (bytes {start}-{start + length - 1} of {self.obj.key})", errno.EIO) \
                    from None
            if got != length:
                raise RemoteError(f"{self.cache.store.what}: {self.obj.key}: {got} bytes at offset {start}, "
                                  f"asked {length}", errno.EIO)
            with self.cache._mutex:
                self.cache.stats["gets"] += 1
                self.cache.stats["bytes"] += length
            for b in run:
                self.present[b] = True
                self.cache._added(self, b)
            landed = True
            for _ in run:
                self._note_change()
        finally:
            if not landed:
                self.cache._unreserve(length)
                if reached > start:  # its blocks are still ours (in flight): no other GET writes them
                    try:
                        _punch(self.fd, start, reached - start)
                    except OSError as e:
                        log.warning("%s: cannot free a failed GET's bytes: %s", self.path, e.strerror)
            with self._mutex:
                for b in run:
                    self._inflight.pop(b, None)

    def _read_ahead(self, offset: int, end: int) -> None:
        """A read that follows the last one: fetch its blocks and those after it in large
        GETs in the background (its own missing ones are then waited for, not fetched
        again one by one)."""
        # Near where the last one ended: the kernel's read-ahead sends a sequential
        # reader's requests several at a time, served by several threads, not in order.
        sequential = offset > 0 and abs(offset - self._seq_end) <= SEQUENTIAL_SLACK
        self._seq_end = max(end, self._seq_end) if sequential else end
        if not sequential:  # a new stream: its read-ahead starts from where it reads
            self._window = FIRST_AHEAD
            self._ahead_to = 0  # (left at the old stream's end, a pass from the start got none)
            return
        ahead = min(self._window, AHEAD_BLOCKS, max(1, self.cache.limit // BLOCK // 4))
        if self._ahead_to - end // BLOCK > ahead - min(ahead // 2, GET_BYTES // BLOCK):
            return  # far enough ahead still: refill once a whole GET fits in the window
        self._window = min(2 * self._window, AHEAD_BLOCKS)
        first = max(offset // BLOCK, self._ahead_to)
        stop = min(end // BLOCK + 1 + ahead, self.blocks)
        if first >= stop:
            return
        self._ahead_to = stop
        with self._mutex:
            todo = [b for b in range(first, stop) if not self.present[b] and b not in self._inflight]
            for run in _runs(todo, GET_BYTES // BLOCK):
                f = self.cache._pool.submit(self._get, run)
                f.add_done_callback(_quiet)
                for b in run:
                    self._inflight[b] = f


def _data_blocks(fd: int, blocks: int) -> list[bool] | None:
    """Which blocks of the file hold any data (SEEK_DATA/SEEK_HOLE); None where the
    filesystem cannot tell (then it cannot punch holes either: evicted bytes stay)."""
    out = [False] * blocks
    pos = 0
    try:
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return out
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for b in range(start // BLOCK, min(-(-end // BLOCK), blocks)):
                out[b] = True
            if end <= start:
                return out
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _runs(blocks: list[int], most: int) -> list[list[int]]:
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][-1] == b - 1 and len(out[-1]) < most:
            out[-1].append(b)
        else:
            out.append([b])
    return out


def _nothing() -> None:
    pass


def _quiet(f: Future[None]) -> None:
    """A read-ahead that failed: the read that needs those blocks fetches and reports."""
    if not f.cancelled() and f.exception() is not None:
        log.info("read-ahead: %s", f.exception())

