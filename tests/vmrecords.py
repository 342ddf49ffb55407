"""The guest workload's records: which one is written when, and what a point in time must hold.

tests/vm_workload.c writes them inside the VM; this module computes the
same schedule on the host (the formulas must stay the same in both) and
checks a disk image read from a backup against it, vectorised, since the
VM test reads every backup whole.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

RECORD = 4096
MAGIC = 0x434552564D534642  # "BFSVMREC" little-endian, as the workload writes it
K = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class Schedule:
    """Which record the workload writes when (the same formulas as vm_workload.c)."""

    slots: int = 4096
    passes: int = 3
    batch: int = 256
    spacing: int = 8192
    writers: int = 1  # guest threads writing each batch: requests in flight at once

    @property
    def records(self) -> int:
        return self.slots * self.passes

    @property
    def batches(self) -> int:
        return -(-self.records // self.batch)

    @property
    def disk_bytes(self) -> int:
        return self.slots * self.spacing

    def cmdline(self) -> str:
        return (f"bfs_slots={self.slots} bfs_passes={self.passes} bfs_batch={self.batch} "
                f"bfs_spacing={self.spacing} bfs_writers={self.writers}")

    def slot_of(self, n: np.ndarray) -> np.ndarray:
        """The slot record(s) ``n`` write."""
        p = n // self.slots
        i = n % self.slots
        a = ((2 * (p * 7919 + 40503) + 1) % self.slots) | 1
        c = (p * 2654435761) % self.slots
        return (i * a + c) % self.slots

    def last_written(self, batches_done: int) -> np.ndarray:
        """Per slot, the number of the newest record in batches < ``batches_done`` (-1: none)."""
        n = np.arange(min(self.records, batches_done * self.batch), dtype=np.int64)
        last = np.full(self.slots, -1, dtype=np.int64)
        np.maximum.at(last, self.slot_of(n), n)
        return last

    def check(self, image: bytes, synced: int, next_batch: int) -> list[str]:
        """What is wrong with ``image`` as a point in time taken after batch
        ``synced`` was durable (-1: none) and before batch ``next_batch`` started.

        Every slot is either zeros (only if no synced batch wrote it) or one
        whole record the schedule wrote there (magic, slot, generation, batch
        and every payload word as written, checksum), no older than the
        newest synced write of that slot and from a batch before
        ``next_batch``; the bytes between records are zeros.
        """
        problems: list[str] = []
        if len(image) != self.disk_bytes:
            return [f"{len(image)} bytes read, the disk has {self.disk_bytes}"]
        rows = np.frombuffer(image, dtype=np.uint8).reshape(self.slots, self.spacing)
        if self.spacing > RECORD and rows[:, RECORD:].any():
            bad = int(np.flatnonzero(rows[:, RECORD:].any(axis=1))[0])
            problems.append(f"slot {bad}: bytes after its record are not zeros")
        words = rows[:, :RECORD].copy().view("<u8")
        zero = ~words.any(axis=1)
        must = self.last_written(synced + 1)
        for s in np.flatnonzero(zero & (must >= 0))[:5]:
            problems.append(f"slot {s}: zeros, but record {must[s]} (batch {must[s] // self.batch}) "
                            f"was synced before the trigger")
        live = np.flatnonzero(~zero)
        w = words[live]
        n = w[:, 4].astype(np.int64)
        in_range = (w[:, 4] < self.records)
        j = np.arange(5, RECORD // 8 - 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            payload_ok = (w[:, 5:-1] == (w[:, 4:5] * np.uint64(K) + j[None, :])).all(axis=1)
        crc_ok = np.array([zlib.crc32(rows[s, : RECORD - 8].tobytes()) == int(words[s, -1]) for s in live],
                          dtype=bool)
        nn = np.where(in_range, n, 0)
        header_ok = ((w[:, 0] == MAGIC) & in_range & (w[:, 1] == live) & (self.slot_of(nn) == live)
                     & (w[:, 2] == nn // self.slots + 1) & (w[:, 3] == nn // self.batch))
        for k in np.flatnonzero(~crc_ok)[:5]:
            problems.append(f"slot {live[k]}: torn record (checksum wrong; header says record {w[k, 4]}, "
                            f"generation {w[k, 2]}, batch {w[k, 3]})")
        for k in np.flatnonzero(crc_ok & ~(header_ok & payload_ok))[:5]:
            problems.append(f"slot {live[k]}: not the record the schedule wrote there (header: slot {w[k, 1]}, "
                            f"record {w[k, 4]}, generation {w[k, 2]}, batch {w[k, 3]})")
        good = crc_ok & header_ok & payload_ok
        stale = good & (n < must[live])
        for k in np.flatnonzero(stale)[:5]:
            s = live[k]
            problems.append(f"slot {s}: record {n[k]} (batch {n[k] // self.batch}), older than record {must[s]} "
                            f"(batch {must[s] // self.batch}) synced before the trigger")
        future = good & (n // self.batch >= next_batch)
        for k in np.flatnonzero(future)[:5]:
            problems.append(f"slot {live[k]}: record {n[k]} of batch {n[k] // self.batch}, which the guest "
                            f"started after the backup's point in time (first such batch: {next_batch})")
        return problems
