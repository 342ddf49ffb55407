"""RBD images as sources, against a real single-node Ceph cluster (tests/cephcluster.py).

The oracle is Ceph's own: `rbd export` of the snapshot a backup took must be
what `qemu-img compare` finds in the backup's chain, and `rbd snap ls` says
which snapshots are left. Data is written with librbd's Python bindings,
as a VM's librbd would, beside backupfs, so only RBD's diff can see it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.repo import Repository
from tests.cephcluster import CephCluster, RbdImage, dead_conf
from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted

pytestmark = [pytest.mark.ceph, pytest.mark.long]

MiB = 1024 * 1024


@contextmanager
def opened(cluster: CephCluster, image: RbdImage) -> Iterator[object]:
    """The image's head through librbd, as another client of the cluster."""
    import rados
    import rbd

    with rados.Rados(conffile=str(cluster.conf)) as r:
        with r.open_ioctx(image.pool) as ioctx:
            if image.namespace:
                ioctx.set_namespace(image.namespace)
            with rbd.Image(ioctx, image.name) as img:
                yield img


def snapshots(cluster: CephCluster, image: RbdImage) -> list[str]:
    return [s["name"] for s in json.loads(cluster.rbd("snap", "ls", "--format", "json", image.spec))]


def export(cluster: CephCluster, image: RbdImage, snap: str, out: Path) -> Path:
    cluster.rbd("export", "--no-progress", f"{image.spec}@{snap}", str(out))
    return out


def assert_backup_is(repo_dir: Path, backup_id: str, raw: Path) -> None:
    """The backup's chain reads as ``raw`` (qemu-img compare) and its image is clean (qemu-img check)."""
    image = next((repo_dir / "devices").glob(f"*/{backup_id}.qcow2"))
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(raw)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def top_layer_extents(repo_dir: Path, backup_id: str) -> list[dict]:
    """What the backup's own image holds (depth 0 of `qemu-img map`): data and zero clusters."""
    image = next((repo_dir / "devices").glob(f"*/{backup_id}.qcow2"))
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return [e for e in json.loads(out) if e["depth"] == 0 and (e["data"] or e.get("zero"))]


@pytest.fixture
def image(rbd_image: Callable[..., RbdImage]) -> RbdImage:
    """A 32 MiB image, removed with its snapshots after the test."""
    return rbd_image(32 * MiB)


@pytest.fixture
def rbd_repo(tmp_path: Path, ceph_cluster: CephCluster, image: RbdImage) -> Path:
    """A repository with device ``vm`` on ``image`` (64 KiB granularity)."""
    repo_dir = tmp_path / "repo"
    cli("init", repo_dir)
    cli("device", "add", repo_dir, "vm", image.source, "--ceph-conf", ceph_cluster.conf)
    return repo_dir


def backup(repo_dir: Path, kind: str, *extra: str) -> str:
    """Take a backup with the CLI; its id."""
    cli("backup", repo_dir, "vm", kind, *extra)
    with Repository.open(str(repo_dir)) as repo:
        latest = repo.latest_backup("vm")
        assert latest is not None
        return latest.id


def test_full_and_incrementals_equal_rbd_export_of_their_snapshots(
        ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path, tmp_path: Path) -> None:
    rng = random.Random(25)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(3 * MiB), 0)
        img.write(rng.randbytes(100_000), 20 * MiB + 12345)
    full = backup(rbd_repo, "full")
    assert snapshots(ceph_cluster, image) == [f"backupfs-{full}"]
    assert_backup_is(rbd_repo, full, export(ceph_cluster, image, f"backupfs-{full}", tmp_path / "full.raw"))

    # Scattered writes by another client: new objects, rewritten data, zeros over data.
    with opened(ceph_cluster, image) as img:
        for _ in range(20):
            img.write(rng.randbytes(4096), rng.randrange(0, 32 * MiB - 4096))
        img.write_zeroes(0, 256 * 1024)
    inc = backup(rbd_repo, "incremental")
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc}"], "the full's snapshot must be removed"
    assert_backup_is(rbd_repo, inc, export(ceph_cluster, image, f"backupfs-{inc}", tmp_path / "inc.raw"))
    # Zeros over data are stored as zero clusters (the chain below holds data there).
    zeros = [e for e in top_layer_extents(rbd_repo, inc) if e.get("zero") and not e["data"]]
    assert any(e["start"] == 0 and e["length"] >= 256 * 1024 for e in zeros), zeros

    # A differential, then another incremental.
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(65536), 8 * MiB)
    diff = backup(rbd_repo, "differential")
    assert_backup_is(rbd_repo, diff, export(ceph_cluster, image, f"backupfs-{diff}", tmp_path / "diff.raw"))
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(4096), 30 * MiB)
    inc2 = backup(rbd_repo, "incremental")
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc2}"]
    assert_backup_is(rbd_repo, inc2, export(ceph_cluster, image, f"backupfs-{inc2}", tmp_path / "inc2.raw"))
    verify = cli("verify", rbd_repo, "vm")
    assert verify.returncode == 0


def test_an_incremental_stores_whole_copy_clusters_and_no_zeros_over_zeros(
        ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path) -> None:
    """4 KiB into an object that did not exist: RBD reports the object from its
    start to that byte (a MiB here); the backup stores one 128 KiB cluster."""
    with opened(ceph_cluster, image) as img:
        img.write(b"\1" * MiB, 0)
    backup(rbd_repo, "full")
    with opened(ceph_cluster, image) as img:
        img.write(b"\2" * 4096, 4 * MiB + MiB + 8192)  # object 1 is new
        img.write(b"\3" * 4096, 100 * 1024)  # inside data the full holds
    inc = backup(rbd_repo, "incremental", "--cluster-size", "128K")
    extents = top_layer_extents(rbd_repo, inc)
    assert all(e["start"] % (128 * 1024) == 0 and e["length"] % (128 * 1024) == 0 for e in extents), extents
    assert sum(e["length"] for e in extents if e["data"]) == 2 * 128 * 1024, extents
    assert not [e for e in extents if not e["data"]], "no zero cluster where the chain below reads zeros"


def test_nothing_changed_makes_no_backup_and_keeps_the_snapshot(
        ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path) -> None:
    with opened(ceph_cluster, image) as img:
        img.write(b"\1" * 65536, 0)
    full = backup(rbd_repo, "full")
    out = cli("backup", rbd_repo, "vm", "incremental").stdout.decode()
    assert "nothing changed" in out
    assert snapshots(ceph_cluster, image) == [f"backupfs-{full}"]
    with Repository.open(str(rbd_repo)) as repo:
        assert [b.id for b in repo.backups("vm")] == [full]
    # Removing the device removes the snapshot its backups kept (and only that one).
    ceph_cluster.rbd("snap", "create", f"{image.spec}@mine")
    cli("device", "remove", rbd_repo, "vm", "--force")
    assert snapshots(ceph_cluster, image) == ["mine"]


@pytest.mark.parametrize("how", ["removed", "made again"])
def test_a_missing_or_foreign_snapshot_makes_the_next_backup_a_scan(
        ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path, tmp_path: Path, how: str) -> None:
    rng = random.Random(7)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(2 * MiB), 0)
    full = backup(rbd_repo, "full")
    ceph_cluster.rbd("snap", "rm", "--no-progress", f"{image.spec}@backupfs-{full}")
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(8192), 5 * MiB)
    if how == "made again":
        ceph_cluster.rbd("snap", "create", f"{image.spec}@backupfs-{full}")
    said = cli("backup", rbd_repo, "vm", "incremental").stdout.decode()
    why = "is missing" if how == "removed" else "was made again by someone else"
    assert f"scanned (its RBD snapshot backupfs-{full} on {image.source} {why}" in said, said
    with Repository.open(str(rbd_repo)) as repo:
        inc = repo.latest_backup("vm")
        assert inc is not None and inc.kind == "incremental" and inc.scanned, inc
        assert repo.jobs("vm", 1)[0].scanned
    # Only the new backup's snapshot is backupfs's now; one made by someone else stays.
    left = snapshots(ceph_cluster, image)
    assert f"backupfs-{inc.id}" in left
    assert left == ([f"backupfs-{full}"] if how == "made again" else []) + [f"backupfs-{inc.id}"]
    assert_backup_is(rbd_repo, inc.id, export(ceph_cluster, image, f"backupfs-{inc.id}", tmp_path / "s.raw"))


def test_a_cancelled_backup_removes_its_snapshot(ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path) -> None:
    with opened(ceph_cluster, image) as img:
        img.write(os.urandom(4 * MiB), 0)
    full = backup(rbd_repo, "full")
    with opened(ceph_cluster, image) as img:
        img.write(os.urandom(4 * MiB), 8 * MiB)
    cancel = threading.Event()
    with Repository.open(str(rbd_repo)) as repo:
        with pytest.raises(Exception, match="cancel"):
            repo.backup("vm", "incremental", cancel=cancel, on_progress=lambda p: cancel.set(),
                        chunk_bytes=64 * 1024)
        assert [b.id for b in repo.backups("vm")] == [full]
    assert snapshots(ceph_cluster, image) == [f"backupfs-{full}"]
    # Nothing lost: the next incremental copies what the cancelled one did not.
    inc = backup(rbd_repo, "incremental")
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc}"]


def test_kill_9_during_a_backup_leaves_no_stray_snapshot_after_the_next_run(
        ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path, tmp_path: Path) -> None:
    with opened(ceph_cluster, image) as img:
        img.write(os.urandom(16 * MiB), 0)
    full = backup(rbd_repo, "full")
    with opened(ceph_cluster, image) as img:
        img.write(os.urandom(16 * MiB), 16 * MiB)
    # Slowed to 2 MiB/s so that it is surely running when killed: its snapshot exists then.
    proc = subprocess.Popen(backupfs_cmd() + ["backup", str(rbd_repo), "vm", "incremental", "--rate", "2M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(snapshots(ceph_cluster, image)) < 2:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the backup never took its snapshot"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stray = [s for s in snapshots(ceph_cluster, image) if s != f"backupfs-{full}"]
    assert len(stray) == 1, "the killed backup's snapshot is there until the next run"
    inc = backup(rbd_repo, "incremental")
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc}"]
    assert_backup_is(rbd_repo, inc, export(ceph_cluster, image, f"backupfs-{inc}", tmp_path / "k.raw"))


def test_an_unreachable_cluster_is_one_line_in_bounded_time(
        ceph_cluster: CephCluster, image: RbdImage, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    cli("init", repo_dir)
    dead = dead_conf(tmp_path / "dead")
    env = {**os.environ, "BACKUPFS_CEPH_TIMEOUT": "1"}
    started = time.monotonic()
    proc = subprocess.run(backupfs_cmd() + ["device", "add", str(repo_dir), "vm", image.source, "--ceph-conf",
                                            str(dead)], capture_output=True, text=True, env=env, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the Ceph cluster" in lines[0] and str(dead) in lines[0], lines
    assert took < 20, took

    # A device whose cluster goes away: its backup fails the same way, and nothing is left.
    conf = tmp_path / "ceph.conf"
    conf.write_text(ceph_cluster.conf.read_text())
    cli("device", "add", repo_dir, "vm", image.source, "--ceph-conf", conf)
    conf.write_text(dead.read_text())
    started = time.monotonic()
    proc = subprocess.run(backupfs_cmd() + ["backup", str(repo_dir), "vm", "full"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot reach the Ceph cluster" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 20
    assert snapshots(ceph_cluster, image) == []


def test_names_and_options_are_checked(ceph_cluster: CephCluster, image: RbdImage, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    cli("init", repo_dir)
    for bad, words in [("rbd:rbd", "rbd:POOL/IMAGE"), ("rbd:rbd/a/b/c", "rbd:POOL/IMAGE"),
                       ("rbd:rbd/x@snap", "not a pool"), ("rbd:nopool/x", "no pool"),
                       ("rbd:rbd/no-such-image", "no image")]:
        proc = cli("device", "add", repo_dir, "vm", bad, "--ceph-conf", ceph_cluster.conf, check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and words in err and len(err.strip().splitlines()) == 1, (bad, err)
    proc = cli("device", "add", repo_dir, "vm", image.source, "--ceph-conf", tmp_path / "none.conf", check=False)
    assert proc.returncode != 0 and "no Ceph configuration" in proc.stderr.decode()
    # A namespace.
    ns_image = ceph_cluster.create_image(4 * MiB, namespace="ns1")
    try:
        cli("device", "add", repo_dir, "nsvm", ns_image.source, "--ceph-conf", ceph_cluster.conf)
        cli("backup", repo_dir, "nsvm", "full")
        listed = json.loads(cli("device", "list", repo_dir, "--json").stdout)
        assert any(d["source"] == ns_image.source for d in listed), listed
    finally:
        cli("device", "remove", repo_dir, "nsvm", "--force")
        ceph_cluster.remove_image(ns_image)


def test_without_the_bindings_an_rbd_source_is_one_line_and_files_still_work(
        ceph_cluster: CephCluster, image: RbdImage, tmp_path: Path) -> None:
    """Python without rados/rbd (sys.modules entries of None make their import fail, as a
    machine without python3-rbd would): one line saying what to install; file sources work."""
    repo_dir = tmp_path / "repo"
    cli("init", repo_dir)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * MiB)
    code = ("import sys; sys.modules['rados'] = None; sys.modules['rbd'] = None; "
            "from backupfs.cli import main; sys.exit(main(sys.argv[1:]))")
    py = sys.executable
    proc = subprocess.run([py, "-c", code, "device", "add", str(repo_dir), "vm", image.source, "--ceph-conf",
                           str(ceph_cluster.conf)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "python3-rbd" in proc.stderr, proc.stderr
    proc = subprocess.run([py, "-c", code, "device", "add", str(repo_dir), "plain", str(disk)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_resized_image_is_refused(ceph_cluster: CephCluster, image: RbdImage, rbd_repo: Path) -> None:
    backup(rbd_repo, "full")
    ceph_cluster.rbd("resize", "--no-progress", "--size", "64M", image.spec)
    proc = cli("backup", rbd_repo, "vm", "incremental", check=False)
    assert proc.returncode != 0 and "changed size" in proc.stderr.decode(), proc.stderr


@pytest.mark.mount
def test_the_mount_serves_an_rbd_device_its_backups_and_their_files(
        ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """An ext4 disk imported into RBD: backups through the trigger, writes
    through the device file (tracked, and in RBD's diff), the files view."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello from rbd\n")
    disk = tmp_path / "disk.img"
    sh(f"truncate -s 32M {disk} && mkfs.ext4 -q -d {tree} {disk}")
    spec = f"rbd/ext4-{os.getpid()}"
    ceph_cluster.rbd("import", "--no-progress", str(disk), spec)
    img = RbdImage("rbd", "", spec.split("/")[1], 32 * MiB)
    repo_dir, mnt = tmp_path / "repo", tmp_path / "mnt"
    mnt.mkdir()
    cli("init", repo_dir)
    cli("device", "add", repo_dir, "vm", img.source, "--ceph-conf", ceph_cluster.conf)
    m = Mounted(repo_dir, mnt)
    try:
        m.start()
        sh(f"echo full > {mnt}/vm/snapshot")
        assert (mnt / "vm/files/latest/disk/hello.txt").read_text() == "hello from rbd\n"
        # A write through the device file: marked, written to RBD, backed up.
        block = os.urandom(65536)
        with open(mnt / "vm/device", "r+b", buffering=0) as f:
            f.seek(30 * MiB)
            f.write(block)
            os.fsync(f.fileno())
        assert "65536 bytes dirty" in (mnt / "vm/bitmap").read_text()
        sh(f"echo incremental > {mnt}/vm/snapshot")
        with open(mnt / "vm/backups/latest", "rb") as f:
            f.seek(30 * MiB)
            assert f.read(65536) == block
        with opened(ceph_cluster, img) as image:
            assert image.read(30 * MiB, 65536) == block
        listed = cli("list", repo_dir, "vm").stdout.decode().splitlines()
        assert len(listed) == 3, listed  # a header and two backups
        m.stop()
        # Prune the full: the chain stays readable, the kept snapshot is the newest backup's.
        with Repository.open(str(repo_dir)) as repo:
            first, newest = [b.id for b in repo.backups("vm")]
        cli("prune", repo_dir, "vm", "--keep-last", "1")
        with Repository.open(str(repo_dir)) as repo:
            assert [b.id for b in repo.backups("vm")] == [newest]
        assert snapshots(ceph_cluster, img) == [f"backupfs-{newest}"]
        export(ceph_cluster, img, f"backupfs-{newest}", tmp_path / "after-prune.raw")
        assert_backup_is(repo_dir, newest, tmp_path / "after-prune.raw")
    finally:
        m.cleanup()
        ceph_cluster.remove_image(img)
