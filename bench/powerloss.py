"""Power-loss ordering, the long run: every recorded instant, not a sample.

Runs tests/test_powerloss.py with POWERLOSS_POINTS=all: a backup (full and
incremental) and a prune (middle and full) are each replayed up to every
write, fsync, rename, unlink, directory fsync and catalog commit they made,
with everything not yet fsynced dropped, and each such state must open as
the old or the new one and pass every check. Prints one line per operation.

    .venv/bin/python -m bench.powerloss
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {**os.environ, "POWERLOSS_POINTS": os.environ.get("POWERLOSS_POINTS", "all")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--timeout", "7200",
         str(ROOT / "tests" / "test_powerloss.py")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    for line in proc.stdout.splitlines():
        if "powerloss " in line:
            print(line[line.index("powerloss "):])
        elif "passed" in line or "failed" in line:
            print(line)
    if proc.returncode:
        print(proc.stdout[-5000:], proc.stderr[-2000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
