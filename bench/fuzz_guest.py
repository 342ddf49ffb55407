"""Mutation fuzzing of guest disks, at length: how engine/guest fares on corrupted real images.

Builds the seed images with the real tools (tests/guest_images.py: ext4,
ext2, XFS, Btrfs, FAT12/16/32, exFAT, NTFS, GPT and MBR disks; as root,
NTFS and exFAT filled through ntfs-3g and mount.exfat-fuse too), corrupts
their metadata case by case, and walks each through the public API in a
worker process under a deadline (tests/guest_fuzz.py). Prints how many
cases ran, ended in GuestDamaged or passed clean, per seed, and every
failure with the command that reproduces it.

    .venv/bin/python -m bench.fuzz_guest --cases 20000
    .venv/bin/python -m bench.fuzz_guest --cases 20000 --workdir /tmp/fuzz-seeds   # keeps the seeds
    .venv/bin/python -m bench.fuzz_guest --only ext2:110 --workdir /tmp/fuzz-seeds  # one case, here, with its traceback
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.guest_fuzz import CaseResult, case_list, run_case, run_cases
from tests.guest_images import BUILDERS, MOUNTED_BUILDERS, SeedImage, build_seeds


def _run_one(seeds: list[SeedImage], spec: str) -> int:
    """Reproduce one case in this process, so a debugger or a traceback sees it."""
    import mmap

    name, number = spec.rsplit(":", 1)
    seed = next(s for s in seeds if s.name == name)
    with open(seed.path, "rb") as f:
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    started = time.monotonic()
    try:
        outcome, detail = run_case(seed, data, int(number))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print(f"{spec}: {outcome} in {time.monotonic() - started:.2f} s\n{detail}")
    return 0


def _report(results: list[CaseResult], seconds: float, again: str) -> int:
    by_seed: dict[str, Counter[str]] = {}
    for r in results:
        by_seed.setdefault(r.seed, Counter())[r.outcome] += 1
    total = Counter(r.outcome for r in results)
    print(f"{'seed':<12} {'cases':>7} {'damaged':>8} {'clean':>7} {'failed':>7}")
    for name, c in sorted(by_seed.items()):
        failed = sum(c.values()) - c["damaged"] - c["clean"]
        print(f"{name:<12} {sum(c.values()):>7} {c['damaged']:>8} {c['clean']:>7} {failed:>7}")
    failures = [r for r in results if r.failed]
    print(f"\n{len(results)} cases in {seconds:.0f} s: {total['damaged']} ended in GuestDamaged, "
          f"{total['clean']} passed clean, {len(failures)} failed "
          f"({', '.join(f'{k} {v}' for k, v in sorted(total.items()) if k not in ('clean', 'damaged')) or 'none'})")
    slowest = max(results, key=lambda r: r.seconds, default=None)
    if slowest is not None:
        print(f"slowest case: {slowest.seed}:{slowest.number} {slowest.seconds:.2f} s ({slowest.outcome})")
    for r in failures:
        print(f"\nFAILED {r.outcome} {r.seed}:{r.number} ({r.seconds:.1f} s): "
              f"reproduce with python -m bench.fuzz_guest --only {r.seed}:{r.number}{again}\n{r.detail}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="cases in all, spread over the seeds")
    ap.add_argument("--first", type=int, default=0, help="the first case number (another run, other cases)")
    can_mount = os.geteuid() == 0 and os.path.exists("/dev/fuse")
    every = [*BUILDERS, *(MOUNTED_BUILDERS if can_mount else [])]
    ap.add_argument("--seeds", default=",".join(every),
                    help=f"which seed images, comma-separated (of {', '.join([*BUILDERS, *MOUNTED_BUILDERS])}; "
                         "the last two are filled through a FUSE mount: root only)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--deadline", type=float, default=30.0, help="seconds a case may take before it is a hang")
    ap.add_argument("--workdir", type=Path, help="where the seeds are built (a temporary directory by default)")
    ap.add_argument("--only", help="run one case SEED:NUMBER in this process and show its traceback")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-guest-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        names = [args.only.rsplit(":", 1)[0]] if args.only else args.seeds.split(",")
        seeds = build_seeds(workdir, names)
        again = f" --workdir {workdir}" if args.workdir else " --workdir DIR (a run with --workdir DIR keeps its seeds)"
        if args.only:
            return _run_one(seeds, args.only)
        cases = case_list(seeds, args.cases, args.first)
        shares = [cases[i :: args.jobs] for i in range(args.jobs)]
        started = time.monotonic()
        done = [0]

        def progress(r: CaseResult) -> None:
            done[0] += 1
            if r.failed:
                print(f"  {r.outcome}: {r.seed}:{r.number}", file=sys.stderr, flush=True)
            if done[0] % 1000 == 0:
                print(f"  {done[0]} cases, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            parts = pool.map(lambda share: list(run_cases(seeds, share, args.deadline, progress)), shares)
            results = [r for part in parts for r in part]
        return _report(results, time.monotonic() - started, again)


if __name__ == "__main__":
    sys.exit(main())
