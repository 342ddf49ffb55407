"""Compressing clusters for a qcow2 image, on two cores, results in order.

A compressed backup spends most of its time in zstd. zstandard releases
the GIL while it compresses, so a small thread pool compresses the pieces
of one chunk while the job's thread reads the next one from the source;
the writer takes the results back in the order they were submitted, so
the image is laid out as if it had been written by one thread.

Memory is bounded by the caller (``Qcow2Writer`` keeps at most a few
chunks in flight); each worker thread has its own ``ZstdCompressor``,
because one compression context cannot be shared by two threads.

The frames are what QEMU writes (qcow2_zstd_compress: one zstd frame per
cluster, level 3, content size in the frame header) and what it reads:
QEMU decompresses until the cluster is full, so a frame must hold exactly
one cluster, which the writer guarantees by padding a short last cluster.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard

from engine.stopsignals import block_stops_in_this_thread

ZSTD_LEVEL = 3  # QEMU's (ZSTD_CLEVEL_DEFAULT): the same ratio as qemu-img convert -c
WORKERS = 2
PIECE_BYTES = 1024 * 1024  # one task: enough work to hide the hand-off, small enough to share out

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor (a context is not safe across threads)."""
    comp = getattr(_local, "zstd", None)
    if comp is None:
        comp = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return comp


def worth_it(cluster_size: int) -> int:
    """The largest compressed size still stored compressed.

    A cluster must save at least an eighth of itself, and at least one
    512-byte sector: a frame that saves less costs a decompression on
    every read for next to no space (and 512-byte clusters are never
    compressed). QEMU keeps any frame shorter than the cluster.
    """
    return cluster_size - max(cluster_size // 8, 512)


def compress_clusters(data: memoryview, cluster_size: int) -> list[bytes | None]:
    """One entry per cluster of ``data``: its zstd frame, or None where the
    cluster is better stored as it is. The last cluster may be short; it
    is compressed as a whole cluster padded with zeros."""
    comp = _compressor()
    limit = worth_it(cluster_size)
    out: list[bytes | None] = []
    n = len(data)
    for start in range(0, n, cluster_size):
        piece = data[start : start + cluster_size]
        if len(piece) < cluster_size:
            piece = memoryview(bytes(piece) + bytes(cluster_size - len(piece)))
        frame = comp.compress(piece)
        out.append(frame if len(frame) <= limit else None)
    return out


class ClusterCompressor:
    """A small pool compressing pieces of chunks; ``submit`` returns futures
    in piece order. ``close`` stops it (pending pieces are dropped)."""

    def __init__(self, cluster_size: int, workers: int = WORKERS) -> None:
        self.cluster_size = cluster_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backupfs-zstd",
                                        initializer=block_stops_in_this_thread)  # engine/stopsignals.py
        # Whole clusters per task, at least one.
        self._piece = max(1, PIECE_BYTES // cluster_size) * cluster_size

    def submit(self, data: memoryview) -> list[Future[list[bytes | None]]]:
        """Start compressing ``data`` (whole clusters, the last may be
        short); ``data`` must not change until the futures are done."""
        return [
            self._pool.submit(compress_clusters, data[s : s + self._piece], self.cluster_size)
            for s in range(0, len(data), self._piece)
        ]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
