"""A mounted filesystem serving corrupt images, many times over.

Each round takes a new full backup through the mount, corrupts its image
(random bytes in the header cluster, the L1/L2 tables, the data, or a
truncation) before anything opens it, and reads the backup through the
mount. The read must either fail with EIO or return bytes that verify; the
daemon must stay alive and the previous backups must still read. Prints
the outcomes and the daemon's fate.

    .venv/bin/python -m bench.fuzz_mounted --rounds 300
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1024 * 1024


def backupfs_cmd() -> list[str]:
    script = Path(sys.executable).parent / "backupfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "backupfs.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(backupfs_cmd() + list(args), capture_output=True, text=True, timeout=300)


def corrupt(path: Path, rng: random.Random) -> str:
    raw = bytearray(path.read_bytes())
    how = rng.choice(["header", "tables", "data", "truncate", "many"])
    if how == "truncate":
        raw = raw[: rng.randrange(0, len(raw))]
    else:
        spans = {"header": (0, 512), "tables": (65536, min(len(raw), 4 * 65536)),
                 "data": (0, len(raw)), "many": (0, len(raw))}
        lo, hi = spans[how]
        for _ in range(200 if how == "many" else rng.randint(1, 8)):
            i = rng.randrange(lo, max(lo + 1, hi))
            if i < len(raw):
                raw[i] = rng.randrange(256)
    path.write_bytes(bytes(raw))
    return how


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    outcomes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="backupfs-fuzzmount-") as tmp:
        root = Path(tmp)
        src, repo, mnt = root / "vm.img", root / "repo", root / "mnt"
        mnt.mkdir()
        with open(src, "wb") as f:
            f.truncate(8 * MiB)
        run("init", str(repo)).check_returncode()
        run("device", "add", str(repo), "vm", str(src)).check_returncode()
        run("mount", str(repo), str(mnt)).check_returncode()
        pid = json.loads((repo / "mount.json").read_text())["pid"]
        try:
            subprocess.run(["bash", "-c", f"echo full > {mnt}/vm/snapshot"], check=True)
            good = sorted(os.listdir(mnt / "vm" / "backups"))[0]
            good_hash = hashlib.sha256((mnt / "vm" / "backups" / good).read_bytes()).hexdigest()
            for _ in range(args.rounds):
                with open(mnt / "vm" / "device", "r+b", buffering=0) as dev:
                    dev.seek(rng.randrange(0, 8 * MiB - 65536))
                    dev.write(rng.randbytes(rng.randrange(1, 65536)))
                # A full: no later backup will depend on the image we damage.
                subprocess.run(["bash", "-c", f"echo full > {mnt}/vm/snapshot"], check=True)
                newest = sorted(p for p in os.listdir(mnt / "vm" / "backups") if p != "latest")[-1]
                how = corrupt(repo / "devices" / "vm" / f"{newest}.qcow2", rng)
                try:
                    (mnt / "vm" / "backups" / newest).read_bytes()
                    result = "read whole (the damage hit unused bytes)"
                except OSError as e:
                    result = "EIO" if e.errno == errno.EIO else f"errno {e.errno}"
                key = f"{how}: {result}"
                outcomes[key] = outcomes.get(key, 0) + 1
                os.kill(pid, 0)  # the daemon is alive
                assert hashlib.sha256((mnt / "vm" / "backups" / good).read_bytes()).hexdigest() == good_hash
                subprocess.run(["bash", "-c", f"echo 'prune remove={newest}' > {mnt}/vm/snapshot"], check=True)
        finally:
            run("umount", str(mnt))
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    print(f"{args.rounds} corrupt images served; daemon crashes: 0; the good backup read right every time")
    for key, n in sorted(outcomes.items()):
        print(f"  {n:5d}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
