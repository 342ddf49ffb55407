"""Changed disk ranges between two backups (engine/history/blocks.py), from the chains' tables.

The ranges must cover every byte that differs between the two backups'
reconstructed disks (checked by reading both), and stay within what the
layers between them hold (no data read to find them).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from engine.history.blocks import changed_ranges, clip, merge, overlaps
from engine.repo import Repository

KiB, MiB = 1024, 1024 * 1024


def _differing(repo: Repository, a: str, b: str, size: int, piece: int = 64 * KiB) -> list[tuple[int, int]]:
    out = []
    with repo.chain(a) as va, repo.chain(b) as vb:
        for pos in range(0, size, piece):
            if bytes(va.read(pos, piece)) != bytes(vb.read(pos, piece)):
                out.append((pos, pos + piece))
    return out


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in ranges)


def test_ranges_cover_every_difference_and_no_more_than_the_layers_hold(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    rng = random.Random(7)
    src.write_bytes(rng.randbytes(8 * MiB))
    repo.add_device("vm", str(src), 64 * KiB)
    ids = [repo.backup("vm", "full").record.id]
    writes: list[list[int]] = []
    for _ in range(3):
        dev = repo.device("vm")
        offsets = sorted(rng.randrange(0, 8 * MiB - 4096) for _ in range(5))
        for off in offsets:
            dev.write(off, rng.randbytes(4096))
        dev.fsync()
        writes.append(offsets)
        ids.append(repo.backup("vm", "incremental").record.id)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            with repo.chain(ids[i]) as a, repo.chain(ids[j]) as b:
                ranges = changed_ranges(a, b)
                assert changed_ranges(b, a) == ranges  # which side is older does not matter
            differing = _differing(repo, ids[i], ids[j], 8 * MiB, piece=4096)
            assert differing  # the writes changed something
            for s, e in differing:
                assert _covered(ranges, s, e), (s, e)
            # Nothing beyond the clusters the writes in between touched (64 KiB granules).
            touched = merge(np.array([[o // (64 * KiB) * 64 * KiB, -(-(o + 4096) // (64 * KiB)) * 64 * KiB]
                                      for w in writes[i:j] for o in w], dtype=np.uint64))
            assert sum(e - s for s, e in ranges) <= sum(e - s for s, e in touched)
    with repo.chain(ids[1]) as a, repo.chain(ids[1]) as b:
        assert changed_ranges(a, b) == []


def test_merge_clip_overlaps() -> None:
    rows = np.array([[10, 20], [0, 5], [20, 30], [40, 50], [45, 46]], dtype=np.uint64)
    assert merge(rows) == [(0, 5), (10, 30), (40, 50)]
    assert clip([(0, 5), (10, 30), (40, 50)], 12, 30) == [(0, 18), (28, 30)]
    ranges = [(0, 5), (10, 30)]
    assert overlaps(ranges, 4, 6) and overlaps(ranges, 29, 100) and overlaps(ranges, 0, 1)
    assert not overlaps(ranges, 5, 10) and not overlaps(ranges, 30, 40)
