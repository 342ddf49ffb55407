"""Random writers on a device while backups run: the backup must be the trigger-time disk.

Shared by tests/test_concurrent_writers.py and bench/concurrent_writers.py.
One run: a device with random content and a chain; a hash of the source
at the trigger instant; two writer threads start with the job's first read
and write random blocks (some into regions the job has not copied yet,
which copy-before-write must save) until the job ends; the backup's
content must hash to the trigger-time value, and the next incremental
must hash to the device's final content.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.job import Source
from engine.repo import Repository

KiB = 1024
MiB = 1024 * KiB


class _Starter(Source):
    """The real source; the first read of the job's own thread releases the writers."""

    def __init__(self, fd: int, path: str, size: int, go: threading.Event) -> None:
        super().__init__(fd, path, size)
        self.go = go
        self.main = threading.get_ident()

    def read(self, offset: int, length: int) -> bytes:
        if threading.get_ident() == self.main:
            self.go.set()
        return super().read(offset, length)


@dataclass
class RunResult:
    kind: str
    cluster_size: int
    writes_during: int
    cbw_units: int
    ok: bool
    scanned: bool = False  # every write went through backupfs: a scan would be a false alarm


def _hash(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def run_once(root: Path, seed: int, size: int = 48 * MiB) -> list[RunResult]:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    src = root / "src.img"
    with open(src, "wb") as f:
        f.truncate(size)
        for _ in range(20):
            f.seek(rng.randrange(0, size - 512 * KiB))
            f.write(rng.randbytes(rng.randrange(4 * KiB, 512 * KiB)))
    Repository.init(str(root / "repo"))
    results = []
    with Repository.open(str(root / "repo")) as repo:
        granularity = rng.choice([32 * KiB, 64 * KiB, 128 * KiB])
        repo.add_device("d", str(src), granularity)
        dev = repo.device("d")
        for kind in ("full", "incremental", "differential", "incremental"):
            cluster = rng.choice([4 * KiB, 64 * KiB, 128 * KiB, 1 * MiB])
            for _ in range(10):
                off = rng.randrange(0, size - 256 * KiB)
                dev.write(off, rng.randbytes(rng.randrange(1, 256 * KiB)))
            expected = _hash(dev.read(0, size))
            go, stop = threading.Event(), threading.Event()
            count = [0]

            def writer(wseed: int) -> None:
                wrng = random.Random(wseed)
                go.wait()
                while not stop.is_set():
                    off = wrng.randrange(0, size - 128 * KiB) // 512 * 512
                    dev.write(off, wrng.randbytes(wrng.choice([512, 4 * KiB, 64 * KiB, 128 * KiB])))
                    count[0] += 1

            threads = [threading.Thread(target=writer, args=(seed * 100 + i,)) for i in range(2)]
            for t in threads:
                t.start()
            try:
                res = repo.backup("d", kind, cluster_size=cluster, chunk_bytes=1 * MiB,
                                  source_factory=lambda d: _Starter(d.fd, d.path, d.size, go))
            finally:
                go.set()
                stop.set()
                for t in threads:
                    t.join()
            with repo.open_backup(res.record.id) as view:
                ok = _hash(view.read(0, size)) == expected
            results.append(RunResult(kind, cluster, count[0], res.cbw_units, ok, res.scanned))
        # No write lost: the next incremental is the device as it is now.
        final = repo.backup("d", "incremental")
        with repo.open_backup(final.record.id) as view:
            results.append(RunResult("final", 0, 0, 0, _hash(view.read(0, size)) == _hash(dev.read(0, size)),
                                     final.scanned))
    return results
