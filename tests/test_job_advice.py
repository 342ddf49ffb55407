"""The copy's advice to the kernel: what it asks to be read ahead, and what
it lets go of in the page cache. Advice cannot change a backup's bytes
(the other tests say those are right); these say the advice is given
where it pays and nowhere else."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.device import Device
from engine.job import READ_AHEAD_BYTES, Source
from engine.repo import Repository

from tests.oracle import qemu_compare

KiB = 1024
MiB = 1024 * KiB


class Recording(Source):
    """The real source; records the reads and the read-ahead advice it is given."""

    def __init__(self, dev: Device, log: list[tuple[str, int, int]]) -> None:
        super().__init__(dev.fd, dev.path, dev.size)
        self.log = log

    def read(self, offset: int, length: int) -> bytes:
        self.log.append(("read", offset, length))
        return super().read(offset, length)

    def _advise(self, offset: int, length: int) -> None:
        self.log.append(("advise", offset, length))
        super()._advise(offset, length)


def covered(ranges: list[tuple[int, int]], offset: int, length: int) -> bool:
    """Whether [offset, offset+length) lies inside the union of ``ranges``."""
    pos = offset
    for a, n in sorted(ranges):
        if a <= pos < a + n:
            pos = a + n
        if pos >= offset + length:
            return True
    return pos >= offset + length


def test_an_incremental_asks_for_its_scattered_clusters_ahead(repo: Repository, tmp_path: Path) -> None:
    """Every cluster after the first is asked for before it is read, never
    more than the read-ahead budget beyond what was read, and nothing that
    is not planned."""
    size = 64 * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    repo.add_device("d", str(src), 64 * KiB)
    repo.backup("d", "full")
    dev = repo.device("d")
    dirty = [i * 1 * MiB + 64 * KiB for i in range(0, 64, 3)]  # 22 scattered 64 KiB writes
    for off in dirty:
        dev.write(off, os.urandom(64 * KiB))
    log: list[tuple[str, int, int]] = []
    inc = repo.backup("d", "incremental", source_factory=lambda d: Recording(d, log))
    qemu_compare(repo.image_path(inc.record), src)
    reads = [(o, n) for what, o, n in log if what == "read"]
    assert sorted(reads) == reads and len(reads) == len(dirty)
    advised: list[tuple[int, int]] = []
    for i, (what, o, n) in enumerate(log):
        if what == "advise":
            assert any(r[0] <= o and o + n <= r[0] + r[1] for r in reads), f"advice for unplanned {o}+{n}"
            advised.append((o, n))
            read_so_far = sum(1 for w, *_ in log[:i] if w == "read")
            assert sum(a[1] for a in advised) <= READ_AHEAD_BYTES + 64 * KiB * (read_so_far + 1)
        elif reads.index((o, n)) > 0:
            assert covered(advised, o, n), f"read of {o}+{n} was not asked for ahead"


def test_a_thin_full_asks_for_no_hole(repo: Repository, tmp_path: Path) -> None:
    """Read ahead, a hole would fill the page cache with zeros: a full of a
    thin 256 MiB disk asks only for its data, all of it."""
    size = 256 * MiB
    src = tmp_path / "thin.img"
    data = [(3 * MiB, 2 * MiB), (100 * MiB, 8 * MiB), (size - 1 * MiB, 1 * MiB)]
    with open(src, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(os.urandom(n))
        f.flush()
        os.fsync(f.fileno())
    repo.add_device("t", str(src), 64 * KiB)
    log: list[tuple[str, int, int]] = []
    full = repo.backup("t", "full", source_factory=lambda d: Recording(d, log))
    qemu_compare(repo.image_path(full.record), src)
    advised = [(o, n) for what, o, n in log if what == "advise"]
    for o, n in advised:
        assert any(a <= o and o + n <= a + m for a, m in data), f"advice over a hole: {o}+{n}"
    for a, m in data[1:]:  # the first is read before any advice
        assert covered(advised, a, m), f"data at {a}+{m} not asked for ahead"


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_a_committed_image_leaves_the_page_cache(repo: Repository, tmp_path: Path) -> None:
    """A full's image does not stay in the page cache: it was 64 MiB of
    pages for a 64 MiB disk, each one a page the kernel had to find."""
    size = 64 * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    repo.add_device("d", str(src), 64 * KiB)
    full = repo.backup("d", "full").record
    image = repo.image_path(full)
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", image],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[0]) < 1 * MiB, out.stdout
