"""Mutation fuzzing of guest disks: corrupt a real image's metadata, walk it, judge the outcome.

A case is a seed image (tests/guest_images.py) and a case number: the
number seeds the random choice of mutations, so ``(seed, number)`` is all
it takes to reproduce one. Each case runs in a worker process under a
deadline: a parser that loops for ever is killed and reported as a hang,
not left to stop the run. The worker's address space is capped, and its
peak memory is checked after every case.

Outcomes: ``clean`` (the walk got through), ``damaged`` (GuestDamaged
somewhere, as it should be for damage), and the failures: ``error`` (any
other exception escaped the public API), ``hang`` (past the deadline),
``slow`` (finished, but over SLOW_SECONDS), ``memory`` (a MemoryError, or
the worker's peak grew by more than MEMORY_BOUND).
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import random
import resource
import struct
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from tests.guest_images import SECTOR, SeedImage
from tests.guest_walk import BytesSource, walk

DEADLINE_SECONDS = 30.0
SLOW_SECONDS = 5.0
MEMORY_BOUND = 200 * 1024 * 1024  # growth of the worker's peak in one case
ADDRESS_SPACE = 4 * 1024**3  # the worker's cap: a huge allocation fails rather than swapping
FAILURES = ("error", "hang", "slow", "memory")
INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1)


@dataclass(frozen=True)
class CaseResult:
    seed: str
    number: int
    outcome: str
    seconds: float
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome in FAILURES


def mutations(seed: SeedImage, data: memoryview, number: int) -> dict[int, bytes]:
    """The patches of case ``number`` on ``seed``: offset -> bytes written there."""
    rng = random.Random(f"{seed.name}:{number}")
    patches: dict[int, bytes] = {}
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8, 16, 40))):
        if seed.metadata and rng.random() < 0.95:
            at = rng.choice(seed.metadata) * SECTOR + rng.randrange(SECTOR)
        else:
            at = rng.randrange(min(seed.size, 256 * 1024))
        patches[at] = _patch(rng, seed, data, at)
    return patches


def _patch(rng: random.Random, seed: SeedImage, data: memoryview, at: int) -> bytes:
    """One mutation's bytes for offset ``at``: the kinds of damage that steer a parser."""
    how = rng.randrange(6)
    if how == 0:  # a flipped bit
        return bytes([data[at] ^ (1 << rng.randrange(8))])
    if how == 1:  # an integer field set to an edge value, either byte order
        width = rng.choice((2, 4, 8))
        value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
        return value.to_bytes(width, rng.choice(("little", "big")))
    if how == 2:  # a small number: an index, a count, a block that points back
        return struct.pack(rng.choice(("<I", ">I", "<Q", ">Q")), rng.randrange(64))
    if how == 3:  # a run of zeros or ones
        return bytes([rng.choice((0, 0xFF))]) * rng.randrange(1, 64)
    if how == 4:
        return rng.randbytes(rng.randrange(1, 16))
    # another structure's bytes where this one was
    other = rng.choice(seed.metadata) * SECTOR if seed.metadata else 0
    return bytes(data[other : other + rng.choice((16, 64, SECTOR))])


def run_case(seed: SeedImage, data: memoryview, number: int) -> tuple[str, str]:
    """(outcome, detail) of one case, in this process: no deadline here."""
    source = BytesSource(data, mutations(seed, data, number))
    try:
        result = walk(source)
    except MemoryError:
        return "memory", "MemoryError escaped"
    except BaseException as e:  # noqa: BLE001  (any escape is the finding)
        return "error", "".join(traceback.format_exception(e))[-3000:]
    joined = " | ".join(result.refusals)
    if "MemoryError" in joined or "too much memory" in joined:
        return "memory", joined
    return result.outcome, joined


def _worker(seeds: list[SeedImage], conn: Connection) -> None:
    """Run cases sent by the parent until it sends None."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    logging.disable(logging.CRITICAL)  # the parsers' and the volume's notes on damage: thousands a run
    images = {}
    for seed in seeds:
        with open(seed.path, "rb") as f:
            images[seed.name] = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    by_name = {s.name: s for s in seeds}
    while (job := conn.recv()) is not None:
        name, number = job
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        started = time.monotonic()
        outcome, detail = run_case(by_name[name], images[name], number)
        seconds = time.monotonic() - started
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        if grew > MEMORY_BOUND and outcome not in FAILURES:
            outcome, detail = "memory", f"peak memory grew by {grew // (1024 * 1024)} MiB"
        if seconds > SLOW_SECONDS and outcome not in FAILURES:
            outcome, detail = "slow", f"{seconds:.1f} s; {detail}"
        conn.send((outcome, detail, seconds))


class Worker:
    """One worker process and the pipe to it; replaced when a case hangs."""

    def __init__(self, seeds: list[SeedImage]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(seeds, child), daemon=True)
        self.process.start()
        child.close()

    def run(self, name: str, number: int, deadline: float) -> CaseResult | None:
        """The case's result, or None if it did not end before the deadline (the worker is then dead)."""
        self.conn.send((name, number))
        if not self.conn.poll(deadline):
            self.stop(kill=True)
            return None
        try:
            outcome, detail, seconds = self.conn.recv()
        except (EOFError, OSError):  # the worker died: a crash in the interpreter, or the OOM killer
            self.stop(kill=True)
            return CaseResult(name, number, "error", 0.0, f"worker died, exit code {self.process.exitcode}")
        return CaseResult(name, number, outcome, seconds, detail)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def run_cases(seeds: list[SeedImage], cases: Iterable[tuple[str, int]], deadline: float = DEADLINE_SECONDS,
              on_result: Callable[[CaseResult], None] | None = None) -> Iterator[CaseResult]:
    """Run each (seed name, number) in a worker under ``deadline``; yield every result."""
    worker = Worker(seeds)
    try:
        for name, number in cases:
            result = worker.run(name, number, deadline)
            if result is None:
                result = CaseResult(name, number, "hang", deadline, f"no answer in {deadline:.0f} s")
            if not worker.process.is_alive() or result.outcome == "memory":
                worker.stop(kill=True)
                worker = Worker(seeds)  # a fresh peak, a fresh heap
            if on_result is not None:
                on_result(result)
            yield result
    finally:
        worker.stop()


def case_list(seeds: list[SeedImage], count: int, first: int = 0) -> list[tuple[str, int]]:
    """``count`` cases spread evenly over the seeds, numbered from ``first``."""
    return [(seeds[i % len(seeds)].name, first + i) for i in range(count)]


def load_seeds(paths: Iterable[Path]) -> list[SeedImage]:
    """Seeds from images already built (the bench keeps them between runs)."""
    from tests.guest_images import metadata_sectors

    out = []
    for p in paths:
        out.append(SeedImage(p.stem, p, p.stat().st_size, metadata_sectors(p)))
    return out
