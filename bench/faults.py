"""Faults, the long run: many failing backups, each must fail cleanly.

Rounds alternate three faults on a device with fresh changes:
- the source's Nth read fails with EIO (the engine's source hook), N random;
- the repository disk fills up (a tmpfs of random size);
- the source shrinks while the backup runs.

After each: the error is the right one (EIO / ENOSPC) with a message naming
the cause, no partial backup is visible or left on disk, the bitmap still
holds every dirty bit (a following clean incremental copies them all and
equals the device), and every remaining image passes `qemu-img check`.

    .venv/bin/python -m bench.faults --rounds 100
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from engine.errors import BackupfsError
from engine.job import FailingSource, Source
from engine.repo import Repository

MiB = 1024 * 1024


def _qemu_ok(repo: Repository, name: str) -> None:
    for b in repo.backups(name):
        out = subprocess.run(["qemu-img", "check", repo.image_path(b)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def _equals_device(repo: Repository, name: str, src: Path) -> None:
    latest = repo.backups(name)[-1]
    out = subprocess.run(["qemu-img", "compare", "-F", "raw", repo.image_path(latest), str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _clean(repo: Repository, name: str, before: list[str]) -> None:
    assert [b.id for b in repo.backups(name)] == before
    files = os.listdir(Path(repo.path) / "devices" / name)
    assert not [f for f in files if f.startswith(".tmp")]
    assert len([f for f in files if f.endswith(".qcow2")]) == len(before)


def round_eio(tmp: Path, rng: random.Random) -> str:
    src = tmp / "src.img"
    with open(src, "wb") as f:
        f.write(rng.randbytes(16 * MiB))
    Repository.init(str(tmp / "repo"))
    with Repository.open(str(tmp / "repo")) as repo:
        repo.add_device("d", str(src))
        repo.backup("d", "full")
        dev = repo.device("d")
        for _ in range(rng.randint(1, 20)):
            dev.write(rng.randrange(0, 16 * MiB - 70000), rng.randbytes(rng.randrange(1, 70000)))
        dirty = dev.since_last.active.count()
        before = [b.id for b in repo.backups("d")]
        n = rng.randint(1, 6)
        try:
            repo.backup("d", "incremental", chunk_bytes=128 * 1024,
                        source_factory=lambda d: FailingSource(d.fd, d.path, d.size, n))
            outcome = "finished before the fault"
        except BackupfsError as e:
            assert e.errno == errno.EIO and "Input/output error" in str(e), e
            _clean(repo, "d", before)
            assert dev.since_last.active.count() == dirty, "a dirty bit was lost"
            outcome = "EIO"
        _qemu_ok(repo, "d")
        repo.backup("d", "incremental")
        _equals_device(repo, "d", src)
    return outcome


def round_enospc(tmp: Path, rng: random.Random) -> str:
    small = tmp / "small"
    small.mkdir()
    size_mb = rng.randint(2, 20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(small)], check=True)
    try:
        src = tmp / "src.img"
        with open(src, "wb") as f:
            f.write(rng.randbytes(24 * MiB))
        Repository.init(str(small / "repo"))
        with Repository.open(str(small / "repo")) as repo:
            repo.add_device("d", str(src))
            try:
                repo.backup("d", "full")
                return "fitted"
            except BackupfsError as e:
                assert e.errno == errno.ENOSPC and "disk full" in str(e), e
                _clean(repo, "d", [])
                assert repo.device("d").since_last.frozen is None
                return "ENOSPC"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


class _Shrinker(Source):
    """Truncates the source to half once the job has read ``at`` chunks."""

    def __init__(self, dev: object, at: int) -> None:
        super().__init__(dev.fd, dev.path, dev.size)  # type: ignore[attr-defined]
        self.at = at
        self.reads = 0
        self.main = threading.get_ident()

    def read(self, offset: int, length: int) -> bytes:
        if threading.get_ident() == self.main:
            self.reads += 1
            if self.reads == self.at:
                os.truncate(self.path, self.size // 2)
        return super().read(offset, length)


def round_shrink(tmp: Path, rng: random.Random) -> str:
    src = tmp / "src.img"
    with open(src, "wb") as f:
        f.write(rng.randbytes(16 * MiB))
    Repository.init(str(tmp / "repo"))
    with Repository.open(str(tmp / "repo")) as repo:
        repo.add_device("d", str(src))
        try:
            repo.backup("d", "full", chunk_bytes=1 * MiB,
                        source_factory=lambda d: _Shrinker(d, rng.randint(1, 12)))
            raise AssertionError("a full backup of a shrinking source succeeded")
        except BackupfsError as e:
            assert e.errno == errno.EIO and "did it shrink?" in str(e), e
            _clean(repo, "d", [])
    return "EIO (shrank)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tally: dict[str, int] = {}
    kinds = [round_eio, round_enospc, round_shrink]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="backupfs-faults-") as tmp:
        for i in range(args.rounds):
            work = Path(tmp) / f"r{i}"
            work.mkdir()
            kind = kinds[i % 3]
            outcome = kind(work, rng)
            key = f"{kind.__name__[6:]}: {outcome}"
            tally[key] = tally.get(key, 0) + 1
            shutil.rmtree(work)
    print(f"{args.rounds} fault rounds, 0 failed checks (no lost dirty bit, no partial backup, images sound)")
    for key, n in sorted(tally.items()):
        print(f"  {n:5d}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
