"""A hostile review of RBD sources (engine side): each test is a way things went, or could go, wrong.

Most run against the session's real Ceph cluster (tests/cephcluster.py, marked
`ceph` and `long` at collection); the catalog's checks need none. Data is written
by another librbd client as a VM would, `rbd export` of a backup's snapshot is
the oracle for its bytes, `rbd snap ls` for what is left on the cluster.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.catalog import Catalog, CatalogError
from engine.ceph import Cluster, parse
from engine.rbdimage import RbdImage as EngineImage
from engine.rbdsource import RbdSource
from engine.repo import Repository
from tests.cephcluster import CephCluster, CephError, RbdImage, dead_conf
from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted
from tests.test_rbd_source import assert_backup_is, export, opened, snapshots
from tests.test_rbd_source import backup as take

KiB = 1024
MiB = 1024 * KiB


def make_repo(tmp_path: Path, cluster: CephCluster, image: RbdImage, *opts: str, name: str = "repo") -> Path:
    repo_dir = tmp_path / name
    cli("init", repo_dir)
    cli("device", "add", repo_dir, "vm", image.source, "--ceph-conf", cluster.conf, *opts)
    return repo_dir


# -- snapshots backupfs did not make ---------------------------------------------------------------


def test_a_protected_old_snapshot_does_not_stop_every_later_backup(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """An admin protects the snapshot of a backup (to `rbd clone` a test VM from
    it). backupfs cannot remove it while it is protected; that must cost one
    snapshot kept too long, not every backup of the device refused."""
    image = rbd_image(8 * MiB)
    repo_dir = make_repo(tmp_path, ceph_cluster, image)
    with opened(ceph_cluster, image) as img:
        img.write(b"a" * MiB, 0)
    full = take(repo_dir, "full")
    held = f"{image.spec}@backupfs-{full}"
    ceph_cluster.rbd("snap", "protect", held)
    try:
        with opened(ceph_cluster, image) as img:
            img.write(b"b" * 4096, 2 * MiB)
        inc1 = take(repo_dir, "incremental")
        with opened(ceph_cluster, image) as img:
            img.write(b"c" * 4096, 3 * MiB)
        proc = cli("backup", repo_dir, "vm", "incremental", check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        with Repository.open(str(repo_dir)) as repo:
            inc2 = repo.latest_backup("vm")
            assert inc2 is not None and inc2.id != inc1
        assert_backup_is(repo_dir, inc2.id, export(ceph_cluster, image, f"backupfs-{inc2.id}", tmp_path / "i.raw"))
        # Unprotected, the next backup removes it: exactly one kept again.
        ceph_cluster.rbd("snap", "unprotect", held)
        with opened(ceph_cluster, image) as img:
            img.write(b"d" * 4096, 4 * MiB)
        inc3 = take(repo_dir, "incremental")
        assert snapshots(ceph_cluster, image) == [f"backupfs-{inc3}"]
    finally:
        try:
            ceph_cluster.rbd("snap", "unprotect", held)
        except CephError:
            pass  # unprotected by the test already


def test_a_snapshot_named_like_ours_by_someone_else_is_never_removed(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """Another repository backing up the same image (cron fires both in the same
    second, their sequence numbers alike) or a user may already hold the name
    ``backupfs-<id>`` the next backup takes. That backup takes the next
    sequence number instead; the snapshot it did not make must survive every
    later backup of this device."""
    image = rbd_image(8 * MiB)
    repo_dir = make_repo(tmp_path, ceph_cluster, image)
    take(repo_dir, "full")
    # The names the next backup (seq 2) takes in the next few seconds, made first by "someone else".
    now = int(time.time())
    theirs = [f"backupfs-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}-0002-incremental"
              for t in range(now - 1, now + 15)]
    with opened(ceph_cluster, image) as img:
        for name in theirs:
            img.create_snap(name)
    with opened(ceph_cluster, image) as img:
        img.write(b"x" * 4096, MiB)
    started = time.time()
    clash = take(repo_dir, "incremental")  # under the next sequence number
    assert started < now + 14, "the backup must have started within the names made"
    assert clash.split("-")[1] == "0003", clash
    assert_backup_is(repo_dir, clash, export(ceph_cluster, image, f"backupfs-{clash}", tmp_path / "c.raw"))
    after = take(repo_dir, "incremental")
    left = snapshots(ceph_cluster, image)
    assert [n for n in theirs if n not in left] == [], "a snapshot backupfs did not make was removed"
    assert f"backupfs-{after}" in left


def test_a_pruned_latest_backup_makes_the_next_a_scan_and_one_snapshot_is_kept(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """Removing the newest backup leaves its snapshot with no backup: the next
    incremental cannot diff from the new newest (its snapshot is gone), so it
    scans, equals its snapshot, and leaves only its own."""
    image = rbd_image(8 * MiB)
    repo_dir = make_repo(tmp_path, ceph_cluster, image)
    rng = random.Random(11)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(3 * MiB), 0)
    take(repo_dir, "full")
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(8192), MiB)
    inc = take(repo_dir, "incremental")
    cli("prune", repo_dir, "vm", "--remove", inc)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(8192), 2 * MiB)
    said = cli("backup", repo_dir, "vm", "incremental").stdout.decode()
    assert "scan" in said, said
    with Repository.open(str(repo_dir)) as repo:
        latest = repo.latest_backup("vm")
        assert latest is not None
    assert snapshots(ceph_cluster, image) == [f"backupfs-{latest.id}"]
    assert_backup_is(repo_dir, latest.id, export(ceph_cluster, image, f"backupfs-{latest.id}", tmp_path / "p.raw"))


def test_rebinding_a_device_to_another_image_removes_the_old_image_s_snapshot(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """`device add --replace` onto another image: the snapshot kept on the old
    image is no backup's base any more and nobody would ever remove it (it
    holds every block the old image rewrites); the new image's next backup
    scans and keeps exactly its own."""
    old, new = rbd_image(4 * MiB), rbd_image(4 * MiB)
    repo_dir = make_repo(tmp_path, ceph_cluster, old)
    with opened(ceph_cluster, old) as img:
        img.write(b"o" * MiB, 0)
    take(repo_dir, "full")
    with opened(ceph_cluster, new) as img:
        img.write(b"n" * MiB, MiB)
    cli("device", "add", repo_dir, "vm", new.source, "--replace", "--ceph-conf", ceph_cluster.conf)
    assert snapshots(ceph_cluster, old) == [], "the old image's snapshot was left behind"
    inc = take(repo_dir, "incremental")
    assert snapshots(ceph_cluster, new) == [f"backupfs-{inc}"]
    assert_backup_is(repo_dir, inc, export(ceph_cluster, new, f"backupfs-{inc}", tmp_path / "n.raw"))


# -- hostile catalog values ---------------------------------------------------------------------------


def hand_made(tmp_path: Path, sql: str) -> Catalog:
    """A catalog with device vm on an RBD image, then ``sql`` run on it as an intruder would."""
    cat = Catalog.create(str(tmp_path / "catalog.db"))
    cat.add_device("vm", "rbd:pool/img", 1 << 20, 65536, ceph='{"conf": "/etc/ceph/ceph.conf"}')
    cat.rbd_snapshot_intent("vm", "backupfs-20261206T000000Z-0001-full")
    with cat.transaction() as c:
        c.execute(sql)
    return cat


@pytest.mark.parametrize("value", ["null", "[1]", "7", '"conf"'])
def test_a_ceph_column_that_is_json_but_no_object_is_refused_not_a_traceback(tmp_path: Path, value: str) -> None:
    cat = hand_made(tmp_path, f"UPDATE devices SET ceph = '{value}' WHERE name = 'vm'")
    try:
        with pytest.raises(CatalogError, match="changed outside backupfs"):
            cat.device("vm")
    finally:
        cat.close()


@pytest.mark.parametrize("sql", [
    "UPDATE rbd_snapshots SET name = 'golden-image'",  # a user's snapshot: the next tidy removed it
    "UPDATE rbd_snapshots SET snap_id = 'x'",
    "UPDATE rbd_snapshots SET backup = '../x'",
], ids=["foreign-name", "text-id", "bad-backup"])
def test_a_hand_made_rbd_snapshot_row_is_refused(tmp_path: Path, sql: str) -> None:
    """backupfs removes the snapshots its rows name: a row no backupfs wrote must never be acted on."""
    cat = hand_made(tmp_path, sql)
    try:
        with pytest.raises(CatalogError, match="changed outside backupfs"):
            cat.rbd_snapshots("vm")
    finally:
        cat.close()


# -- what a backup reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,cluster_size,size,opts", [
    ("64K", "512K", 8 * MiB + 12 * KiB, ()),           # copy cluster 512 KiB, size not a multiple of it
    ("4K", "64K", 6 * MiB + 4 * KiB, ()),               # granules smaller than clusters
    ("64K", "64K", 6 * MiB, ("--compress", "zstd")),   # compressed layers
], ids=["512K-over-64K", "4K-under-64K", "zstd"])
def test_incrementals_equal_the_snapshot_in_odd_geometries(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        granularity: str, cluster_size: str, size: int, opts: tuple[str, ...]) -> None:
    """Compare mode (an incremental stores what differs from the chain's
    checksums) must give the snapshot's bytes whatever the geometry: data over
    data, zeros over data (write_zeroes and discard), bytes rewritten alike,
    the short last cluster, and a differential after a prune."""
    image = rbd_image(size)
    repo_dir = make_repo(tmp_path, ceph_cluster, image, "--granularity", granularity, *opts)
    rng = random.Random(size)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(2 * MiB), 0)
        img.write(rng.randbytes(size - 5 * MiB), 5 * MiB)  # up to the very end
    ids = [take(repo_dir, "full", "--cluster-size", cluster_size)]
    steps: list[Callable[[object], None]] = [
        lambda img: (img.write(rng.randbytes(3000), 70_000), img.write(rng.randbytes(100), size - 100)),
        lambda img: (img.write_zeroes(0, 300 * KiB), img.discard(5 * MiB, 256 * KiB)),
        lambda img: img.write(img.read(MiB, 200 * KiB), MiB),  # the same bytes again
        lambda img: (img.write(b"\0" * 8192, 3 * MiB), img.write(rng.randbytes(5), size - 5)),
    ]
    for step in steps:
        with opened(ceph_cluster, image) as img:
            step(img)
        ids.append(take(repo_dir, "incremental", "--cluster-size", cluster_size))
        assert_backup_is(repo_dir, ids[-1], export(ceph_cluster, image, f"backupfs-{ids[-1]}",
                                                   tmp_path / f"{len(ids)}.raw"))
    cli("prune", repo_dir, "vm", "--keep-last", "2")
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(70_000), 2 * MiB - 1000)
    diff = take(repo_dir, "differential", "--cluster-size", cluster_size)
    assert_backup_is(repo_dir, diff, export(ceph_cluster, image, f"backupfs-{diff}", tmp_path / "d.raw"))
    assert snapshots(ceph_cluster, image) == [f"backupfs-{diff}"]


def test_a_clone_is_backed_up_with_its_parent_s_bytes(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """An image cloned from a snapshot (`rbd clone`) reads its parent's bytes where it has
    written nothing: the full and the incrementals must hold them, as `rbd export` does."""
    parent = rbd_image(8 * MiB)
    rng = random.Random(7)
    with opened(ceph_cluster, parent) as img:
        img.write(rng.randbytes(6 * MiB), MiB)
    ceph_cluster.rbd("snap", "create", f"{parent.spec}@base")
    ceph_cluster.rbd("snap", "protect", f"{parent.spec}@base")
    child = RbdImage(parent.pool, parent.namespace, parent.name + "-clone", parent.size)
    ceph_cluster.rbd("clone", f"{parent.spec}@base", child.spec)
    try:
        repo_dir = make_repo(tmp_path, ceph_cluster, child)
        with opened(ceph_cluster, child) as img:
            img.write(rng.randbytes(4096), 3 * MiB)
        full = take(repo_dir, "full")
        assert_backup_is(repo_dir, full, export(ceph_cluster, child, f"backupfs-{full}", tmp_path / "f.raw"))
        with opened(ceph_cluster, child) as img:
            img.write(rng.randbytes(4096), 5 * MiB)
            img.write_zeroes(6 * MiB, 128 * KiB)
        inc = take(repo_dir, "incremental")
        assert_backup_is(repo_dir, inc, export(ceph_cluster, child, f"backupfs-{inc}", tmp_path / "i.raw"))
        cli("device", "remove", repo_dir, "vm", "--force")
    finally:
        ceph_cluster.remove_image(child)
        ceph_cluster.rbd("snap", "unprotect", f"{parent.spec}@base")


def test_an_image_rolled_back_to_an_older_snapshot_is_backed_up_as_it_now_reads(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """`rbd snap rollback` to a snapshot older than the last backup rewrites the
    head behind backupfs's back: objects that did not exist then are removed,
    others get their old bytes. The next incremental must equal the image."""
    image = rbd_image(12 * MiB)
    rng = random.Random(13)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(MiB), 0)
    ceph_cluster.rbd("snap", "create", f"{image.spec}@mine")
    try:
        repo_dir = make_repo(tmp_path, ceph_cluster, image)
        with opened(ceph_cluster, image) as img:
            img.write(rng.randbytes(MiB), 512 * KiB)   # over data that was there
            img.write(rng.randbytes(MiB), 9 * MiB)     # an object that did not exist
        full = take(repo_dir, "full")
        assert_backup_is(repo_dir, full, export(ceph_cluster, image, f"backupfs-{full}", tmp_path / "f.raw"))
        ceph_cluster.rbd("snap", "rollback", "--no-progress", f"{image.spec}@mine")
        inc = take(repo_dir, "incremental")
        assert_backup_is(repo_dir, inc, export(ceph_cluster, image, "mine", tmp_path / "mine.raw"))
        assert_backup_is(repo_dir, inc, export(ceph_cluster, image, f"backupfs-{inc}", tmp_path / "i.raw"))
    finally:
        ceph_cluster.rbd("snap", "rm", "--no-progress", f"{image.spec}@mine")


def test_read_ahead_gives_the_snapshot_s_bytes_however_reads_and_pieces_are_split(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage]) -> None:
    """RbdSource with pieces that do not line up with the reads: reads that start inside
    a piece, span several, skip some, run past the advice, and holes in the map."""
    image = rbd_image(4 * MiB)
    rng = random.Random(3)
    with opened(ceph_cluster, image) as img:
        img.write(rng.randbytes(4 * MiB), 0)
        img.create_snap("s")
        truth = img.read(0, 4 * MiB)
        img.write(rng.randbytes(4 * MiB), 0)  # the head moves on; the snapshot must be read
    unit = 64 * KiB
    with Cluster(parse(image.source, str(ceph_cluster.conf))) as cluster:
        for allocated in (None, "holes"):
            snap = EngineImage(cluster, snapshot="s")
            bits = None
            if allocated:
                bits = snap.allocated_units(unit, 4 * MiB)
            src = RbdSource(snap, 4 * MiB, unit, bits, piece=3 * unit, in_flight=10 * unit)
            try:
                src.will_need(0, 4 * MiB)
                reads = [(unit, 100 * KiB), (unit + 100 * KiB, 7), (5 * unit, 200 * KiB),
                         (20 * unit, 3 * unit + 1), (30 * unit, unit)]
                src.will_need(32 * unit, 8 * unit)
                reads += [(32 * unit, 8 * unit), (41 * unit, 5 * unit), (63 * unit, unit)]
                for off, n in reads:
                    assert src.read(off, n) == truth[off: off + n], (allocated, off, n)
                    src.will_need(off + n, 6 * unit)
            finally:
                src.close()
                snap.close()
        with opened(ceph_cluster, image) as img:
            img.remove_snap("s")


def test_a_full_of_a_thin_image_reads_no_hole_one_round_trip_at_a_time(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage]) -> None:
    """A thin image with a little data at the start of each RADOS object (as a
    fresh file system's metadata): RBD's map reports each object up to its last
    written byte, the rest is a hole. The job claims 8 MiB runs holding both,
    the read-ahead reads only the data; the holes between must come back as
    zeros from the map, not as one waited-for read each (31 MiB of them here)."""
    size, unit = 32 * MiB, 64 * KiB
    image = rbd_image(size)
    rng = random.Random(9)
    with opened(ceph_cluster, image) as img:
        for obj in range(0, size, 4 * MiB):
            img.write(rng.randbytes(unit + 100), obj)
        img.create_snap("s")
        truth = img.read(0, size)
    with Cluster(parse(image.source, str(ceph_cluster.conf))) as cluster:
        snap = EngineImage(cluster, snapshot="s")
        src = RbdSource(snap, size, unit, snap.allocated_units(unit, size))
        try:
            src.will_need(0, size)
            got = b"".join(src.read(off, 8 * MiB) for off in range(0, size, 8 * MiB))
        finally:
            src.close()
    assert got == truth
    assert src.read_now_bytes == 0, src.read_now_bytes
    with opened(ceph_cluster, image) as img:
        img.remove_snap("s")


def test_a_long_running_process_does_not_keep_each_backup_s_snapshot_open(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """The mount's daemon runs backups for months: each one's snapshot, opened
    to read it, must be closed when the backup ends, not kept until unmount."""
    image = rbd_image(4 * MiB)
    repo_dir = make_repo(tmp_path, ceph_cluster, image)
    with opened(ceph_cluster, image) as img:
        img.write(b"z" * MiB, 0)
    with Repository.open(str(repo_dir)) as repo:
        dev = repo.device("vm")
        for kind in ("full", "incremental", "incremental"):
            with opened(ceph_cluster, image) as img:
                img.write(os.urandom(4096), MiB)
            repo.backup("vm", kind)
        cluster = dev.cluster  # type: ignore[attr-defined]
        # The head and the one reader every backup sets to its snapshot in turn, back at the head.
        assert [i.snapshot for i in cluster.images] == [None, None], "snapshot images left open"


@pytest.mark.ceph
@pytest.mark.long
def test_an_osd_dying_mid_backup_is_one_line_in_bounded_time_and_no_backup(tmp_path: Path) -> None:
    """A cluster of this test's own: the OSD is killed while a rate-limited full
    copies. The backup must end within a few timeouts with one line naming the
    image, and no backup may appear (the aio read-ahead waits on its pieces)."""
    cluster = CephCluster(tmp_path / "ceph", memstore_bytes=768 << 20).start()
    proc = None
    try:
        # Far more than the read-ahead holds (engine/rbdsource.py: 64 MiB in
        # flight): with less, all of it could arrive before the kill, and the
        # backup rightly succeed.
        image = cluster.create_image(192 * MiB)
        with opened(cluster, image) as img:
            img.write(random.Random(1).randbytes(160 * MiB), 0)
        repo_dir = make_repo(tmp_path, cluster, image)
        first = take(repo_dir, "full")
        env = {**os.environ, "BACKUPFS_CEPH_TIMEOUT": "1"}
        proc = subprocess.Popen(backupfs_cmd() + ["backup", str(repo_dir), "vm", "full", "--rate", "24M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 30
        while len(snapshots(cluster, image)) < 2:  # the second backup's snapshot: it is copying
            assert proc.poll() is None and time.monotonic() < deadline, "the backup ended too soon"
        cluster._daemons["osd"].signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
        said = err.decode()
        assert proc.returncode != 0 and "Traceback" not in said, said
        assert len(said.strip().splitlines()) == 1 and image.spec in said, said
        assert took < 30, took
        with Repository.open(str(repo_dir)) as repo:
            assert [b.id for b in repo.backups("vm")] == [first]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.stop()


# -- the mount --------------------------------------------------------------------------------------


@pytest.mark.mount
def test_the_device_file_under_parallel_direct_writers_then_an_unreachable_cluster(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """Four `dd oflag=direct` at once into the device file land in the image
    and in the next incremental; reads past the end are short; remounted with
    the cluster out of reach, the mount still serves the other device."""
    image = rbd_image(16 * MiB)
    repo_dir, mnt = make_repo(tmp_path, ceph_cluster, image), tmp_path / "mnt"
    mnt.mkdir()
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"p" * MiB)
    cli("device", "add", repo_dir, "disk", plain)
    conf = tmp_path / "ceph.conf"  # the device's conf, made unreachable below
    conf.write_text(ceph_cluster.conf.read_text())
    cli("device", "remove", repo_dir, "vm", "--force")
    cli("device", "add", repo_dir, "vm", image.source, "--ceph-conf", conf)
    rng = random.Random(5)
    parts = [rng.randbytes(MiB + 512) for _ in range(4)]
    for i, data in enumerate(parts):
        (tmp_path / f"w{i}").write_bytes(data[: MiB])
    m = Mounted(repo_dir, mnt)
    try:
        m.start()
        sh(f"echo full > {mnt}/vm/snapshot")
        writers = " & ".join(f"dd if={tmp_path}/w{i} of={mnt}/vm/device bs=64K seek={1 + 3 * i}M "
                             f"oflag=direct,seek_bytes conv=notrunc,fsync status=none" for i in range(4))
        sh(f"{writers} & wait")
        with open(mnt / "vm/device", "rb") as f:
            f.seek(16 * MiB - 10)
            assert f.read(100) == b"\0" * 10  # short at the end, nothing past it
            assert f.read(100) == b""
        with opened(ceph_cluster, image) as img:
            for i, data in enumerate(parts):
                assert img.read((1 + 3 * i) * MiB, MiB) == data[: MiB], i
        sh(f"echo incremental > {mnt}/vm/snapshot")
        latest = os.path.basename(os.readlink(mnt / "vm/backups/latest"))
        with open(mnt / "vm/backups/latest", "rb") as f:
            for i, data in enumerate(parts):
                f.seek((1 + 3 * i) * MiB)
                assert f.read(MiB) == data[: MiB], i
        m.stop()
        assert_backup_is(repo_dir, latest, export(ceph_cluster, image, f"backupfs-{latest}",
                                                     tmp_path / "m.raw"))
        # The cluster out of reach: the other device is still served.
        conf.write_text(dead_conf(tmp_path / "dead").read_text())
        m = Mounted(repo_dir, mnt, env={"BACKUPFS_CEPH_TIMEOUT": "1"})
        started = time.monotonic()
        m.start()
        assert (mnt / "disk/device").read_bytes() == b"p" * MiB
        assert time.monotonic() - started < 30
        proc = sh(f"echo incremental > {mnt}/vm/snapshot", check=False)
        assert proc.returncode != 0
        status = (mnt / "vm/snapshot").read_text()
        assert "cannot reach the Ceph cluster" in status and "bitmap: kept" in status, status
        assert time.monotonic() - started < 30
    finally:
        m.cleanup()


WRITER = """
import os, random, sys
rng = random.Random(int(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_WRONLY)
for _ in range(int(sys.argv[3])):
    os.pwrite(fd, rng.randbytes(rng.choice((512, 4096, 65536, 100000))), rng.randrange(0, 16 * 1024 * 1024 - 100000))
    if rng.random() < 0.1:
        os.fsync(fd)
os.close(fd)
"""


@pytest.mark.mount
def test_backups_taken_while_the_device_file_is_written_equal_their_snapshots(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """Two writers keep writing through the device file while incrementals are
    triggered: each backup must be exactly its RBD snapshot (nothing read from
    the moving head, no write lost between the snapshot and the frozen bitmap),
    and one taken after the writers stop equals the image."""
    image = rbd_image(16 * MiB)
    repo_dir, mnt = make_repo(tmp_path, ceph_cluster, image), tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(repo_dir, mnt)
    writers: list[subprocess.Popen[bytes]] = []
    try:
        m.start()
        sh(f"echo full > {mnt}/vm/snapshot")
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / "vm/device"), str(seed), "600"])
                   for seed in (1, 2)]
        taken = []
        for _ in range(3):
            sh(f"echo incremental > {mnt}/vm/snapshot")
            taken.append(os.path.basename(os.readlink(mnt / "vm/backups/latest")))
            # Its snapshot is kept until the next backup commits: export it now.
            export(ceph_cluster, image, f"backupfs-{taken[-1]}", tmp_path / f"{taken[-1]}.raw")
        for w in writers:
            assert w.wait(timeout=120) == 0
        sh(f"echo incremental > {mnt}/vm/snapshot")
        last = os.path.basename(os.readlink(mnt / "vm/backups/latest"))
        # Each backup, read through the mount, against its own snapshot (kept: the latest only).
        cluster_snaps = snapshots(ceph_cluster, image)
        assert cluster_snaps == [f"backupfs-{last}"], cluster_snaps
        ceph_cluster.rbd("export", "--no-progress", image.spec, str(tmp_path / "head.raw"))
        assert (mnt / "vm/backups/latest").read_bytes() == (tmp_path / "head.raw").read_bytes()
        for ident in taken:
            assert (mnt / "vm/backups" / ident).read_bytes() == (tmp_path / f"{ident}.raw").read_bytes(), ident
        m.stop()
        assert_backup_is(repo_dir, last, tmp_path / "head.raw")
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        m.cleanup()
