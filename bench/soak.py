"""Soak: a VM-like workload on a mounted device for ten minutes or more.

Random 4-64 KiB guest writes at a fixed rate, an incremental every few
seconds, then every backup verified against its recorded checksums and
compared with the device as it was at its trigger, and the daemon's
resident memory before and after (tests/soak.py does the work).

    .venv/bin/python -m bench.soak --minutes 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.soak import MiB, soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between incrementals")
    parser.add_argument("--size", type=int, default=256, help="device size in MiB")
    parser.add_argument("--rate", type=float, default=2.0, help="guest writes in MiB/s")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="backupfs-soak-") as tmp:
        result = soak(Path(tmp), args.minutes * 60, args.interval, args.size * MiB, int(args.rate * MiB))
    print(result.render())
    growth = (result.rss_end_kib - result.rss_start_kib) / 1024
    print(f"RSS growth {growth:+.1f} MiB (bound: 64 MiB)")
    ok = result.mismatches == 0 and result.verify_ok and growth < 64
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
