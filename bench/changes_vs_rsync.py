"""What changed in a backup: History against `rsync -n` between kernel mounts of two backups.

What is measured
    An ext4 volume of FILES small files (default 100,000, in DIRS = 1000
    directories, made by ``mkfs.ext4 -d``) is a device of a repository;
    a full backup. Then CHANGED files (default 100) are rewritten through
    the device: the repository mounted, MOUNT/vm/device loop-mounted by the
    kernel, the files changed, the loop unmounted, ``echo incremental >
    MOUNT/vm/snapshot``. What changed in that incremental, two ways, caches
    dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before each:

    * ``mount``: ``cat MOUNT/vm/changes/<id>`` in a freshly started mount
      (nothing parsed or cached; its guest parsers loaded in the background
      at start, which the bench waits for), caches dropped: the issue's
      "first read".
    * ``ours``: ``History(repo).changes(rec)`` in a fresh process on the
      unmounted repository: the same call without FUSE. Timed end to end
      (interpreter start, imports, repository open, the call) and the call
      alone; the guest parsers are imported before the call, as a running
      mount has them (their first import is ~0.3 s of compiling dissect's
      structure definitions).
    * ``rsync``: ``rsync -rlptgoDn --delete --itemize-changes NEW/ OLD/``
      between read-only kernel mounts of MOUNT/vm/backups/<old> and <new>
      (``losetup -r`` on the FUSE files): what an admin does today. The
      mounts are made before the caches are dropped; only rsync is timed.
    * ``rsync raw``: the same rsync between loop mounts of the two backups
      exported to raw files on the same disk (`backupfs image cat`): no
      FUSE under the loop devices, rsync's best case.

    Rounds alternate ours, rsync, rsync raw, three times; the ratios are
    rsync's time over ours, whole process and the call alone (the issue's
    goal: >= 5; the first read of ``changes/<id>`` in a running mount pays
    the call, not the interpreter's start). Both sides' line counts are
    printed, and ours must name every changed file as ``M``. The load
    average is printed: on a shared machine both sides slow down.

    Versions: one more file is changed in each of VERSIONS - 1 further
    incrementals (default 49; the source changed through a loop mount of
    it, incrementals with scan=True), so it has VERSIONS versions;
    ``History(repo).versions(...)`` of it is timed cold in a fresh process,
    what ``ls -l MOUNT/vm/versions/disk/PATH/`` will call.

Why
    The issue's promise: the cost of "what changed" follows the change
    (the changed clusters name the inode-table blocks to compare), not the
    size of the filesystem, which rsync walks whole on both sides.

Run by hand (root: mounts, loop devices, drop_caches):
    .venv/bin/python -m bench.changes_vs_rsync [--files 100000] [--changed 100]
        [--versions 50] [--rounds 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from statistics import median
from contextlib import contextmanager
from pathlib import Path

from engine.repo import Repository

ROOT = Path(__file__).resolve().parent.parent
BACKUPFS = [str(Path(sys.executable).parent / "backupfs")]
RSYNC = ["rsync", "-rlptgoDn", "--delete", "--itemize-changes"]
DEVICE = "vm"
VOLUME = "disk"


def run(*args: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([os.fspath(a) for a in args], check=True, capture_output=True, timeout=3600,
                          **kw)  # type: ignore[call-overload]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def file_name(i: int, dirs: int) -> str:
    return f"d{i % dirs:04d}/f{i // dirs:05d}"


# --------------------------------------------------------------- building


def build_image(work: Path, files: int, dirs: int) -> Path:
    """A 100,000-file ext4 image, made without mounting (mkfs.ext4 -d from a tmpfs staging tree)."""
    stage = Path(tempfile.mkdtemp(prefix="changes-stage-", dir="/dev/shm"))
    try:
        rng = random.Random(22)
        for d in range(dirs):
            (stage / f"d{d:04d}").mkdir()
        for i in range(files):
            (stage / file_name(i, dirs)).write_bytes(rng.randbytes(rng.randrange(50, 2000)))
        image = work / "source.img"
        size = max(1 << 30, files * 8192)
        with open(image, "wb") as f:
            f.truncate(size)
        run("mkfs.ext4", "-F", "-q", "-i", "8192", "-d", stage, image)
        return image
    finally:
        shutil.rmtree(stage)


@contextmanager
def loop_mount(target: Path, read_only: bool) -> Iterator[Path]:
    """``target`` (an image or a FUSE file) mounted by the kernel through a loop device."""
    device = run("losetup", "--find", "--show", *(["-r"] if read_only else []), target).stdout.decode().strip()
    where = Path(tempfile.mkdtemp(prefix="changes-mnt-"))
    try:
        run("mount", "-t", "ext4", "-o", "ro" if read_only else "rw", device, where)
        try:
            yield where
        finally:
            run("umount", where)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
        where.rmdir()


@contextmanager
def repository_mounted(repo: Path, mnt: Path) -> Iterator[Path]:
    run(*BACKUPFS, "mount", repo, mnt)
    try:
        yield mnt
    finally:
        run(*BACKUPFS, "umount", mnt)


def rewrite(path: Path, rng: random.Random) -> None:
    path.write_bytes(rng.randbytes(rng.randrange(50, 2000)))


# ---------------------------------------------------------------- timing


OURS = """
import json, sys, time
t0 = time.perf_counter()
from engine.repo import Repository
from engine.history.history import History
from engine.history.changes import render
# The guest parsers, imported by a mount once (their first use would count them in the call).
import engine.guest.fs_btrfs, engine.guest.fs_ext, engine.guest.fs_fat, engine.guest.fs_ntfs, engine.guest.fs_xfs
t1 = time.perf_counter()
repo = Repository.open(sys.argv[1], writable=False)
rec = repo.backup_record(sys.argv[2])
t2 = time.perf_counter()
found = History(repo).changes(rec)
t3 = time.perf_counter()
text = render(found)
repo.close()
print(json.dumps({"imports": t1 - t0, "open": t2 - t1, "changes": t3 - t2, "lines": len(found),
                  "text": text.decode()}))
"""

VERSIONS = """
import json, sys, time
t0 = time.perf_counter()
from engine.repo import Repository
from engine.history.history import History
repo = Repository.open(sys.argv[1], writable=False)
t1 = time.perf_counter()
found = History(repo).versions(sys.argv[2], sys.argv[3], tuple(p.encode() for p in sys.argv[4].split("/")))
t2 = time.perf_counter()
repo.close()
print(json.dumps({"open": t1 - t0, "versions": t2 - t1, "count": len(found)}))
"""


def time_ours(repo: Path, backup_id: str) -> dict:
    drop_caches()
    t = time.perf_counter()
    out = run(sys.executable, "-c", OURS, repo, backup_id, cwd=ROOT).stdout
    wall = time.perf_counter() - t
    return {"wall": wall, **json.loads(out)}


def mounted_ready(repo: Path) -> None:
    """Wait until the fresh mount has loaded its guest parsers (it does so in the
    background at start, as a mount that has been up a while has long done)."""
    log = repo / "backupfs.log"
    deadline = time.monotonic() + 60
    while "parsers loaded" not in log.read_text().split("serving")[-1]:
        if time.monotonic() > deadline:
            raise RuntimeError("the mount did not load its parsers within 60 s")
        time.sleep(0.05)


def time_mount_read(repo: Path, mnt: Path, command: list[str]) -> float:
    """A fresh mount (nothing parsed, nothing cached), caches dropped, then the first
    ``command`` (run in the mount point; its output thrown away)."""
    with repository_mounted(repo, mnt):
        mounted_ready(repo)
        drop_caches()
        t = time.perf_counter()
        subprocess.run(command, cwd=mnt, check=True, timeout=3600, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t


def time_rsync(old: Path, new: Path) -> tuple[float, list[str]]:
    """rsync between two read-only loop mounts (made before the caches are dropped)."""
    with loop_mount(old, True) as a, loop_mount(new, True) as b:
        drop_caches()
        t = time.perf_counter()
        proc = run(*RSYNC, f"{b}/", f"{a}/")
        wall = time.perf_counter() - t
    return wall, [x for x in proc.stdout.decode(errors="replace").split("\n") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--changed", type=int, default=100)
    ap.add_argument("--versions", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: loop devices, mounts, drop_caches", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="changes-vs-rsync-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    repo_dir = work / "repo"
    try:
        t = time.perf_counter()
        image = build_image(work, args.files, args.dirs)
        print(f"built {args.files} files in {args.dirs} directories: {time.perf_counter() - t:.1f} s "
              f"({image.stat().st_size >> 20} MiB image)", flush=True)
        Repository.init(str(repo_dir))
        repo = Repository.open(str(repo_dir))
        repo.add_device(DEVICE, str(image))
        full = repo.backup(DEVICE, "full").record
        repo.close()

        rng = random.Random(1)
        version_file = file_name(args.files // 2, args.dirs)
        chosen = sorted(set(rng.sample(range(args.files), args.changed + 1)) - {args.files // 2})[: args.changed]
        changed = [file_name(i, args.dirs) for i in chosen]
        with repository_mounted(repo_dir, mnt):
            with loop_mount(mnt / DEVICE / "device", False) as root:
                for name in changed:
                    rewrite(root / name, rng)
            (mnt / DEVICE / "snapshot").write_text("incremental\n")
        repo = Repository.open(str(repo_dir), writable=False)
        inc = repo.latest_backup(DEVICE)
        repo.close()
        assert inc is not None and inc.parent == full.id, inc
        print(f"changed {len(changed)} files through the device; incremental {inc.id}", flush=True)

        raw_old, raw_new = work / "old.raw", work / "new.raw"
        for rec, out in ((full, raw_old), (inc, raw_new)):
            with open(out, "wb") as f:
                subprocess.run(BACKUPFS + ["image", "cat", str(repo_dir / rec.image)], stdout=f, check=True)

        ours_runs, rsync_runs, raw_runs, mount_runs = [], [], [], []
        rsync_out: list[str] = []
        for _ in range(args.rounds):
            mount_runs.append(time_mount_read(repo_dir, mnt, ["cat", f"{DEVICE}/changes/{inc.id}"]))
            ours_runs.append(time_ours(repo_dir, inc.id))
            with repository_mounted(repo_dir, mnt):
                wall, rsync_out = time_rsync(mnt / DEVICE / "backups" / full.id, mnt / DEVICE / "backups" / inc.id)
            rsync_runs.append(wall)
            raw_runs.append(time_rsync(raw_old, raw_new)[0])

        text = ours_runs[-1]["text"].splitlines()
        want = {f"M\t{VOLUME}/{n}" for n in changed}
        missing = want - set(text)
        print(f"\nours: {len(text)} lines; rsync: {len(rsync_out)} lines; "
              f"changed files missing from ours: {len(missing)}")
        if missing:
            print("  missing:", sorted(missing)[:5])

        print(f"\n{'round':>5} {'ours wall':>10} {'ours call':>10} {'rsync fuse':>11} {'rsync raw':>10} "
              f"{'fuse/wall':>10} {'fuse/call':>10} {'raw/call':>9}")
        for i, (o, r, w) in enumerate(zip(ours_runs, rsync_runs, raw_runs), 1):
            print(f"{i:>5} {o['wall']:>9.2f}s {o['changes']:>9.2f}s {r:>10.2f}s {w:>9.2f}s "
                  f"{r / o['wall']:>10.1f} {r / o['changes']:>10.1f} {w / o['changes']:>9.1f}")
        print(f"first read of MOUNT/{DEVICE}/changes/<id>, fresh mount, caches dropped: "
              + ", ".join(f"{x:.2f}s" for x in mount_runs)
              + f"; rsync fuse / it (medians): {median(rsync_runs) / median(mount_runs):.1f} (goal >= 5)")
        med = sorted(range(args.rounds), key=lambda i: ours_runs[i]["wall"])[args.rounds // 2]
        o = ours_runs[med]
        print(f"ours, median round: imports {o['imports']:.2f}s, open {o['open']:.2f}s, changes {o['changes']:.2f}s "
              f"(imports: the interpreter's and the guest parsers', which a mount pays once)")
        print(f"median ratios: rsync fuse / ours wall {median(rsync_runs) / median([x['wall'] for x in ours_runs]):.1f}, "
              f"/ ours call {median(rsync_runs) / median([x['changes'] for x in ours_runs]):.1f}; "
              f"rsync raw / ours call {median(raw_runs) / median([x['changes'] for x in ours_runs]):.1f} "
              f"(goal >= 5); load average {os.getloadavg()[0]:.1f}")

        # ------------------------------------------------------------- versions
        t = time.perf_counter()
        repo = Repository.open(str(repo_dir))
        for k in range(args.versions - 1):
            with loop_mount(image, False) as root:
                (root / version_file).write_bytes(f"version {k + 2}\n".encode() * (k + 1))
            repo.backup(DEVICE, "incremental", scan=True)
        repo.close()
        print(f"\n{args.versions - 1} more incrementals changing {version_file}: {time.perf_counter() - t:.1f} s")
        for _ in range(args.rounds):
            drop_caches()
            t = time.perf_counter()
            out = json.loads(run(sys.executable, "-c", VERSIONS, repo_dir, DEVICE, VOLUME, version_file,
                                 cwd=ROOT).stdout)
            wall = time.perf_counter() - t
            print(f"versions of {VOLUME}/{version_file}: {out['count']} versions, cold: {wall:.2f}s wall, "
                  f"{out['versions']:.2f}s the call", flush=True)
        for _ in range(args.rounds):
            took = time_mount_read(repo_dir, mnt, ["ls", "-l", f"{DEVICE}/versions/{VOLUME}/{version_file}/"])
            print(f"ls -l MOUNT/{DEVICE}/versions/{VOLUME}/{version_file}/, fresh mount, caches dropped: "
                  f"{took:.2f}s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
