"""Push and remote-mount speed against plain boto3 and a local mount (issue item 5).

What is measured, in one run, on a throwaway Ceph cluster's radosgw
(tests/cephcluster.py, loopback only):

* ``push``: `Repository.push` of a repository holding one full backup of a
  SIZE device (random data), to a fresh prefix each run, in this process;
  against boto3's ``upload_file`` of the same image file (its default
  TransferConfig: 8 MiB parts, 10 threads) to a fresh key. Throughput =
  image bytes / wall time. Goal: push >= 0.8x.
* ``remote cold``: a sequential read (1 MiB reads, ``cat``-like) of the
  newest backup through `backupfs mount s3://...` with an empty cache,
  against the same read through a local `backupfs mount` with the images
  dropped from the page cache (POSIX_FADV_DONTNEED) and a fresh mount.
  Goal: >= 0.5x.
* ``remote cached``: the same read again after an unmount and remount of
  the remote with the same cache, its files dropped from the page cache
  as the local images are (no GET made), against the local cold read.
  Goal: >= 0.9x.

Runs alternate the contestants; the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from engine.units import format_size, parse_size

MiB = 1 << 20


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(path: Path) -> tuple[int, float]:
    """Bytes read and seconds, 1 MiB reads into one buffer."""
    buf = bytearray(MiB)
    done = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            done += n
    return done, time.perf_counter() - started


def _cmd(env: dict[str, str], *args: str) -> None:
    from tests.commands import backupfs_cmd

    proc = subprocess.run(backupfs_cmd() + list(args), capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"backupfs {' '.join(args)}: {proc.stderr.strip()}")


def _umount(env: dict[str, str], mnt: Path, pid_file: Path | None = None) -> None:
    pid = json.loads(pid_file.read_text())["pid"] if pid_file and pid_file.exists() else None
    _cmd(env, "umount", str(mnt))
    if pid is not None:
        from backupfs.mountinfo import wait_for_exit

        wait_for_exit(pid, 60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256M", help="device size (default 256M)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    size = parse_size(args.size)

    import boto3

    from engine.remote.location import make_spec
    from engine.repo import Repository
    from tests.cephcluster import CephCluster

    work = Path(tempfile.mkdtemp(prefix="s3bench-", dir=args.workdir or "/var/tmp"))
    cluster = CephCluster(work / "ceph", rgw=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=cluster.access_key, AWS_SECRET_ACCESS_KEY=cluster.secret_key,
                   AWS_ENDPOINT_URL=cluster.endpoint, AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        client = boto3.client("s3", endpoint_url=cluster.endpoint, region_name="us-east-1")
        bucket = "bench-" + secrets.token_hex(4)
        client.create_bucket(Bucket=bucket)

        disk = work / "disk"
        with open(disk, "wb") as f:
            for _ in range(size // (8 * MiB)):
                f.write(os.urandom(8 * MiB))
        repo = work / "repo"
        Repository.init(str(repo))
        with Repository.open(str(repo)) as r:
            r.add_device("vm1", str(disk))
            r.backup("vm1", "full")
        image = next((repo / "devices" / "vm1").glob("*.qcow2"))
        ident = image.name[:-len(".qcow2")]
        nbytes = image.stat().st_size
        print(f"s3_push_mount: {format_size(size)} device, image {format_size(nbytes)}, {args.runs} runs, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")

        push_s, boto_s = [], []
        for run in range(args.runs):
            started = time.perf_counter()
            client.upload_file(str(image), bucket, f"boto/{run}/{image.name}")
            boto_s.append(time.perf_counter() - started)
            name = f"r{run}"
            with Repository.open(str(repo)) as r:
                r.add_remote(make_spec(name, f"s3://{bucket}/push{run}", cluster.endpoint))
            started = time.perf_counter()
            Repository.push(str(repo), name)
            push_s.append(time.perf_counter() - started)
        url = f"s3://{bucket}/push0"

        # Context: what boto3 itself gets from this radosgw, 8 ranged GETs of 8 MiB in flight.
        from concurrent.futures import ThreadPoolExecutor

        def get(offset: int) -> int:
            r = client.get_object(Bucket=bucket, Key=f"boto/0/{image.name}",
                                  Range=f"bytes={offset}-{offset + 8 * MiB - 1}")
            return len(r["Body"].read())

        raw_s = []
        for _ in range(args.runs):
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                assert sum(pool.map(get, range(0, nbytes, 8 * MiB))) == nbytes
            raw_s.append(time.perf_counter() - started)

        local_s, cold_s, warm_s = [], [], []
        for run in range(args.runs):
            lmnt, rmnt, cache = work / f"lmnt{run}", work / f"rmnt{run}", work / f"cache{run}"
            lmnt.mkdir()
            rmnt.mkdir()
            for img in (repo / "devices" / "vm1").glob("*.qcow2"):
                _drop(img)
            _cmd(env, "mount", str(repo), str(lmnt))
            try:
                n, t = _read_all(lmnt / "vm1" / "backups" / ident)
                assert n == size, n
                local_s.append(t)
            finally:
                _umount(env, lmnt, repo / "mount.json")
            _cmd(env, "mount", url, str(rmnt), "-o", f"cache={cache}")
            try:
                n, t = _read_all(rmnt / "vm1" / "backups" / ident)
                assert n == size, n
                cold_s.append(t)
            finally:
                _umount(env, rmnt, cache / "mount.json")
            for data in cache.glob("*.data"):  # cold on disk, as the local images are
                _drop(data)
            _cmd(env, "mount", url, str(rmnt), "-o", f"cache={cache}")
            try:
                n, t = _read_all(rmnt / "vm1" / "backups" / ident)
                gets = int(os.getxattr(rmnt, "user.backupfs.remote_gets"))
                assert n == size and gets == 0, (n, gets)
                warm_s.append(t)
            finally:
                _umount(env, rmnt, cache / "mount.json")

        def rate(seconds: list[float], amount: int) -> float:
            return amount / statistics.median(seconds) / MiB

        boto, push = rate(boto_s, nbytes), rate(push_s, nbytes)
        local, cold, warm = rate(local_s, size), rate(cold_s, size), rate(warm_s, size)
        print(f"  boto3 upload_file   {boto:7.1f} MiB/s   runs {[round(s, 2) for s in boto_s]} s")
        print(f"  push                {push:7.1f} MiB/s   runs {[round(s, 2) for s in push_s]} s")
        print(f"  boto3 ranged GETs   {rate(raw_s, nbytes):7.1f} MiB/s   (8 MiB, 8 in flight; context)")
        print(f"  local mount, cold   {local:7.1f} MiB/s   runs {[round(s, 2) for s in local_s]} s")
        print(f"  remote mount, cold  {cold:7.1f} MiB/s   runs {[round(s, 2) for s in cold_s]} s")
        print(f"  remote mount, cache {warm:7.1f} MiB/s   runs {[round(s, 2) for s in warm_s]} s")
        for what, ratio, goal in (("push / boto3", push / boto, 0.8), ("remote cold / local", cold / local, 0.5),
                                  ("remote cached / local", warm / local, 0.9)):
            print(f"  {what:24s} {ratio:5.2f}  (goal >= {goal})  {'ok' if ratio >= goal else 'MISSED'}")
        return 0
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
