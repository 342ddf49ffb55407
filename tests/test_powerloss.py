"""Power loss at any instant of a backup or a prune leaves the old state or the new one.

Each operation runs once with the recording layer (tests/powerloss.py);
then, for crash points around every fsync, rename and commit, the
repository is rebuilt as a power loss there would leave it and must:
open (recovery included), show exactly the old or the new list of backups,
have every image pass `qemu-img check` and `verify`, read every backup
exactly as before, and take a next incremental equal to the device.

POWERLOSS_POINTS=all tests every recorded instant (the long run).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import durable
from engine.repo import Repository

from tests.oracle import qemu_check, qemu_compare
from tests.powerloss import Recorder, materialize, snapshot

KiB = 1024
MiB = 1024 * KiB
_POINTS = os.environ.get("POWERLOSS_POINTS", "14")
LIMIT = None if _POINTS == "all" else int(_POINTS)


def _digests(repo: Repository) -> dict[str, str]:
    out = {}
    for b in repo.backups("d"):
        with repo.open_backup(b.id) as view:
            out[b.id] = hashlib.sha256(view.read(0, view.size)).hexdigest()
    return out


@pytest.fixture
def prepared(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A repository with a device and a chain of three backups, plus fresh changes."""
    src = tmp_path / "src.img"
    rng = random.Random(4)
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        for _ in range(8):
            f.seek(rng.randrange(0, 7 * MiB))
            f.write(rng.randbytes(rng.randrange(1000, 300 * KiB)))
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("d", str(src), 64 * KiB)
        dev = repo.device("d")
        repo.backup("d", "full", cluster_size=128 * KiB)
        for cs in (4 * KiB, 64 * KiB):
            for _ in range(3):
                dev.write(rng.randrange(0, 8 * MiB - 100 * KiB), rng.randbytes(rng.randrange(1, 100 * KiB)))
            repo.backup("d", "incremental", cluster_size=cs)
        for _ in range(3):
            dev.write(rng.randrange(0, 8 * MiB - 100 * KiB), rng.randbytes(rng.randrange(1, 100 * KiB)))
    yield repo_dir, src


def _run_recorded(repo_dir: Path, start: Path, operation: Callable[[Repository], None]) -> tuple[Recorder, dict, dict]:
    with Repository.open(str(repo_dir)) as repo:
        before = _digests(repo)
        snapshot(str(repo_dir), str(start))
        recorder = Recorder(str(repo_dir))
        previous = durable.install(recorder)
        try:
            operation(repo)
        finally:
            durable.install(previous)
        after = _digests(repo)
    return recorder, before, after


def _check_crash(repo_dir: Path, src: Path, before: dict, after: dict) -> str:
    with Repository.open(str(repo_dir)) as repo:
        ids = [b.id for b in repo.backups("d")]
        assert ids in (sorted(before), sorted(after)), ids
        expected = before if ids == sorted(before) else after
        for b in repo.backups("d"):
            qemu_check(repo.image_path(b))
        assert _digests(repo) == expected
        report = repo.verify("d")
        assert report.ok, report.render()
        leftovers = [f for f in os.listdir(repo_dir / "devices" / "d") if f.startswith(".tmp")]
        assert not leftovers
        rec = repo.backup("d", "incremental").record
        qemu_compare(repo.image_path(rec), src)
        return "old" if expected is before else "new"


@pytest.mark.parametrize(
    "name, operation",
    [
        ("incremental", lambda r: r.backup("d", "incremental", cluster_size=64 * KiB, chunk_bytes=256 * KiB)),
        ("full", lambda r: r.backup("d", "full", cluster_size=128 * KiB, chunk_bytes=1 * MiB)),
        ("prune-middle", lambda r: r.prune("d", remove=r.backups("d")[1].id)),
        ("prune-full", lambda r: r.prune("d", remove=r.backups("d")[0].id)),
    ],
)
def test_power_loss_at_any_instant(name: str, operation: Callable[[Repository], None],
                                   prepared: tuple[Path, Path], tmp_path: Path) -> None:
    repo_dir, src = prepared
    start = tmp_path / "start"
    recorder, before, after = _run_recorded(repo_dir, start, operation)
    assert sorted(before) != sorted(after)
    kinds = {op[0] for op in recorder.ops}
    assert {"write", "fsync", "rename", "fsync_dir", "catalog"} <= kinds, kinds
    outcomes = {"old": 0, "new": 0}
    # The long run tries every instant; the quick one the instants around
    # barriers (fsync, rename, unlink, directory fsync, commit), sampled.
    points = list(range(len(recorder.ops) + 1)) if _POINTS == "all" else recorder.crash_points(LIMIT)
    for k in points:
        crashed = tmp_path / f"crash-{k}"
        materialize(str(start), recorder.ops[:k], str(crashed))
        outcomes[_check_crash(crashed, src, before, after)] += 1
        shutil.rmtree(crashed)
    print(f"powerloss {name}: {len(recorder.ops)} recorded operations, {len(points)} crash points, "
          f"old state {outcomes['old']}, new state {outcomes['new']}, 0 failures")
    # Both outcomes occur: the crash points straddle the commit.
    assert outcomes["old"] and outcomes["new"]
