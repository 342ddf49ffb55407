"""Isolation, the long run: hostile names and trigger lines against a live mount.

- `backupfs device add` with random names (slashes, dots, NULs, unicode,
  long ones): each is refused, or creates exactly one directory under
  REPO/devices/ with that name;
- random trigger lines (grammar words mixed with paths, quotes, control
  bytes) written to MOUNT/vm/snapshot: each fails with EINVAL/ENOENT or
  runs a legitimate command; the daemon stays up; nothing appears outside
  the repository (a sentinel directory beside it stays empty);
- another user cannot list the mount (no allow_other).

    .venv/bin/python -m bench.isolation --count 2000
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1024 * 1024
WORDS = ["full", "incremental", "differential", "verify", "prune", "cluster_size=64K", "label=", "backup=",
         "remove=", "keep_last=1", "dry_run=1", "scan=1", "rate=8M", "../", "/etc/passwd", "..", "/", "'", '"',
         "\\", "$(touch x)", "`id`", ";", "&&", "*", "\x00", "\x1b[2J", "é", "\u202e", "x" * 300, "\n", " "]


def backupfs_cmd() -> list[str]:
    script = Path(sys.executable).parent / "backupfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "backupfs.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="backupfs-isolation-") as tmp:
        root = Path(tmp)
        sentinel = root / "sentinel"
        sentinel.mkdir()
        src, repo, mnt = root / "vm.img", root / "repo", root / "mnt"
        mnt.mkdir()
        with open(src, "wb") as f:
            f.truncate(4 * MiB)
        run = lambda *a: subprocess.run(backupfs_cmd() + list(a), capture_output=True, text=True)  # noqa: E731
        assert run("init", str(repo)).returncode == 0
        assert run("device", "add", str(repo), "vm", str(src)).returncode == 0
        # Device names.
        names_ok = names_refused = 0
        for _ in range(max(20, args.count // 20)):
            name = "".join(rng.choice(WORDS[13:] + ["a", "b", "0", "-", "_", "."]) for _ in range(rng.randint(1, 6)))
            name = name.replace("\x00", "")  # argv cannot carry NUL
            before = set(os.listdir(repo / "devices"))
            proc = run("device", "add", str(repo), name, str(src))
            after = set(os.listdir(repo / "devices"))
            if proc.returncode == 0:
                assert after - before == {name} and "/" not in name and name not in (".", ".."), name
                names_ok += 1
                assert run("device", "remove", str(repo), name).returncode == 0
            else:
                assert after == before and "Traceback" not in proc.stderr, (name, proc.stderr)
                names_refused += 1
        assert run("mount", str(repo), str(mnt)).returncode == 0
        pid = json.loads((repo / "mount.json").read_text())["pid"]
        try:
            snap = mnt / "vm" / "snapshot"
            fd = os.open(snap, os.O_WRONLY)
            try:
                os.write(fd, b"full\n")
            finally:
                os.close(fd)
            for _ in range(args.count):
                line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
                fd = os.open(snap, os.O_WRONLY)
                try:
                    os.write(fd, line.encode("utf-8", "surrogateescape"))
                    key = "accepted: " + line.split()[0] if line.split() else "accepted"
                except OSError as e:
                    key = errno.errorcode.get(e.errno or 0, str(e.errno))
                    assert e.errno in (errno.EINVAL, errno.ENOENT, errno.EBUSY), (line, e)
                finally:
                    os.close(fd)
                results[key] = results.get(key, 0) + 1
                os.kill(pid, 0)
            assert os.listdir(sentinel) == []
            assert not Path("x").exists()
            other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", str(mnt)],
                                   capture_output=True, text=True)
            assert other.returncode != 0 and "Permission denied" in other.stderr
        finally:
            run("umount", str(mnt))
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        log = (repo / "backupfs.log").read_text()
        assert "Traceback" not in log
    print(f"device names: {names_ok} accepted (each made exactly its own directory), {names_refused} refused")
    print(f"{args.count} trigger lines through the mount; daemon alive throughout; nothing outside the repository; "
          "another user: Permission denied")
    for key, n in sorted(results.items()):
        print(f"  {n:5d}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
