"""Crash injection, the long run: SIGKILL backupfs hundreds of times.

Alternates the unmounted CLI and the mounted daemon as the victim, and a
full backup, an incremental and a prune as what it is doing; kills it after
a random delay; then checks (tests/crashkill.py): the repository opens, the
backups are the old set or the old set plus/minus the one in flight, every
image passes `qemu-img check` and `backupfs verify`, surviving backups read
exactly as before, and the next incremental equals the device.

    .venv/bin/python -m bench.crash_kill --kills 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.crashkill import Lab, Tally, run_rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="backupfs-crash-") as tmp:
        lab = Lab(Path(tmp) / "lab", args.seed)
        tally = Tally()
        try:
            done = 0
            while done < args.kills:
                batch = min(30, args.kills - done)
                run_rounds(lab, batch, tally)
                done += batch
                print(f"{done} kills, {tally.outcomes}", flush=True)
        finally:
            lab.cleanup()
    print(f"\n{tally.kills} SIGKILLs in {time.monotonic() - started:.0f} s, 0 failed checks")
    for kind, n in sorted(tally.by_kind.items()):
        print(f"  {kind:22s} {n}")
    print(f"  outcome: old state {tally.outcomes.get('old', 0)}, new state {tally.outcomes.get('new', 0)}; "
          f"the victim had already finished in {tally.finished_before_kill} CLI rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
