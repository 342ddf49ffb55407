"""Concurrent writers, the long run: backups while two threads write at random.

Each run takes a full, an incremental, a differential and another
incremental of a device (random granularity and cluster sizes) while two
writer threads hammer it; every backup must hash to the device as it was
at the trigger, and a final incremental to the device as it is
(tests/concurrency.py). Prints runs, backups, writes and mismatches.

    .venv/bin/python -m bench.concurrent_writers --runs 50
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.concurrency import run_once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    started = time.monotonic()
    backups = writes = cbw = mismatches = 0
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="backupfs-writers-") as tmp:
        for seed in range(1, args.runs + 1):
            results = run_once(Path(tmp) / f"run{seed}", seed)
            shutil.rmtree(Path(tmp) / f"run{seed}")
            backups += len(results)
            writes += sum(r.writes_during for r in results)
            cbw += sum(r.cbw_units for r in results)
            bad = [r for r in results if not r.ok]
            mismatches += len(bad)
            print(f"run {seed}: {len(results)} backups, {sum(r.writes_during for r in results)} writes during jobs, "
                  f"{sum(r.cbw_units for r in results)} copy-before-write clusters, {len(bad)} mismatches", flush=True)
    print(f"\n{args.runs} runs, {backups} backups, {writes} concurrent writes, {cbw} copy-before-write clusters, "
          f"{mismatches} mismatches, {time.monotonic() - started:.0f} s")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
