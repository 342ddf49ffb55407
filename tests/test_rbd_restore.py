"""`backupfs restore REPO NAME ID rbd:POOL/IMAGE`: a backup written into an RBD image.

Against the real single-node cluster the session starts (``ceph_cluster``);
`rbd export` and `qemu-img convert` are the oracles for the bytes, `rbd diff`
for what the restore allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.qcow2.layers import DATA, open_layer
from tests.cephcluster import NAMESPACE, CephCluster, RbdImage, dead_conf
from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.oracle import qemu_raw

MiB = 1024 * 1024
OBJECT = 4 * MiB  # rbd create's default object size
SIZE = 24 * MiB


@dataclass
class Backups:
    """A repository whose file device ``vm`` has a full and an incremental backup."""

    repo: Path
    full: str
    incremental: str
    full_raw: bytes  # each backup as QEMU reads it
    incremental_raw: bytes


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture(scope="module")
def backups(tmp_path_factory: pytest.TempPathFactory) -> Backups:
    """Data in RBD objects 0, 2 and 5 at the full; the incremental adds object
    3 and zeroes what object 2 held (so it is all zeros there)."""
    from engine.repo import Repository

    d = tmp_path_factory.mktemp("rbdrestore")
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
    _write(src, 1 * MiB, os.urandom(100 * 1024))
    _write(src, 9 * MiB, os.urandom(64 * 1024))
    _write(src, 21 * MiB, os.urandom(MiB))
    repo = d / "repo"
    Repository.init(str(repo))
    with Repository.open(str(repo)) as r:
        r.add_device("vm", str(src))
        full = r.backup("vm", "full")
        _write(src, 13 * MiB, os.urandom(64 * 1024))
        _write(src, 9 * MiB, bytes(64 * 1024))
        inc = r.backup("vm", "incremental", scan=True)
        images = {b.id: r.image_path(b) for b in r.backups("vm")}
    full_id, inc_id = full.record.id, inc.record.id
    return Backups(repo, full_id, inc_id, qemu_raw(images[full_id], d), qemu_raw(images[inc_id], d))


@pytest.fixture
def made(ceph_cluster: CephCluster) -> Iterator[Callable[[str], str]]:
    """``made(prefix)``: a new, unique image name for a restore to make; the
    image (in pool rbd, or in its namespace) is removed after the test."""
    names: list[str] = []

    def name(prefix: str) -> str:
        names.append(f"{prefix}-{os.urandom(4).hex()}")
        return names[-1]

    yield name
    for n in names:
        for image in (RbdImage("rbd", "", n, 0), RbdImage("rbd", NAMESPACE, n, 0)):
            info = subprocess.run(["rbd", "-c", str(ceph_cluster.conf), "info", image.spec], capture_output=True)
            if info.returncode == 0:
                ceph_cluster.remove_image(image)


def rbd(cluster: CephCluster, *args: str) -> bytes:
    """The rbd CLI's stdout, as bytes (an export is binary)."""
    proc = subprocess.run(["rbd", "-c", str(cluster.conf), *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def export(cluster: CephCluster, spec: str) -> bytes:
    return rbd(cluster, "export", "--no-progress", spec, "-")


def objects_held(cluster: CephCluster, spec: str) -> list[int]:
    """The RADOS objects (by index) the image holds data in, as `rbd diff` reports them."""
    found = json.loads(rbd(cluster, "diff", "--whole-object", "--format", "json", spec))
    return sorted({e["offset"] // OBJECT for e in found if e["exists"] in (True, "true")})


def objects_with_data(raw: bytes) -> list[int]:
    return [i for i in range(-(-len(raw) // OBJECT)) if any(raw[i * OBJECT:(i + 1) * OBJECT])]


def image_names(cluster: CephCluster, pool_ns: str = "rbd") -> list[str]:
    return sorted(json.loads(rbd(cluster, "ls", "--format", "json", pool_ns)))


def restore(backups: Backups, ident: str, target: str, cluster: CephCluster, *more: str,
            check: bool = True) -> subprocess.CompletedProcess:
    return cli("restore", backups.repo, "vm", ident, target, "--ceph-conf", cluster.conf, *more, check=check)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and err.count("\n") == 1 and err.startswith("backupfs: error: "), err
    return err


def test_a_new_image_holds_the_backup_and_only_its_data(backups: Backups, ceph_cluster: CephCluster,
                                                       made: Callable[[str], str]) -> None:
    name = made("new")
    proc = restore(backups, "latest", f"rbd:rbd/{name}", ceph_cluster)
    out = proc.stdout.decode()
    assert f"to rbd:rbd/{name} (new RBD image)" in out, out
    assert export(ceph_cluster, f"rbd/{name}") == backups.incremental_raw
    # Sparse: object 2 (zeroed by the incremental) and the never-written
    # objects were not written at all.
    assert objects_with_data(backups.incremental_raw) == [0, 3, 5]
    assert objects_held(ceph_cluster, f"rbd/{name}") == [0, 3, 5]
    assert not [n for n in image_names(ceph_cluster) if ".restoring" in n]


def test_a_namespace_image_and_an_older_backup(backups: Backups, ceph_cluster: CephCluster,
                                               made: Callable[[str], str]) -> None:
    name = made("ns")
    restore(backups, backups.full, f"rbd:rbd/{NAMESPACE}/{name}", ceph_cluster)
    assert export(ceph_cluster, f"rbd/{NAMESPACE}/{name}") == backups.full_raw
    assert name in image_names(ceph_cluster, f"rbd/{NAMESPACE}")
    assert name not in image_names(ceph_cluster)


def test_an_existing_image_of_another_size_needs_force_and_gets_the_backups_size_and_zeros(
        backups: Backups, ceph_cluster: CephCluster, made: Callable[[str], str]) -> None:
    # Data everywhere: where the backup holds zeros, the restore must write zeros.
    everywhere = os.urandom(16 * MiB)
    image = RbdImage("rbd", "", made("old"), len(everywhere))
    ceph_cluster.rbd("import", "--no-progress", "-", image.spec, input=everywhere)

    err = one_line_error(restore(backups, "latest", image.source, ceph_cluster, check=False))
    assert "exists and is 16 MiB" in err and "the backup is 24 MiB" in err and "--force" in err
    assert export(ceph_cluster, image.spec) == everywhere  # refused: untouched

    out = restore(backups, "latest", image.source, ceph_cluster, "--force").stdout.decode()
    assert "(RBD image, overwritten)" in out and "resized from 16 MiB to 24 MiB" in out, out
    assert export(ceph_cluster, image.spec) == backups.incremental_raw

    # The same size now, and nobody has it open: written without --force (the contract).
    restore(backups, backups.full, image.source, ceph_cluster)
    assert export(ceph_cluster, image.spec) == backups.full_raw


def test_an_image_in_use_is_refused_naming_its_client_unless_forced(backups: Backups, ceph_cluster: CephCluster,
                                                      rbd_image: Callable[..., RbdImage]) -> None:
    import rados
    import rbd as rbdlib

    image = rbd_image(SIZE)
    before = export(ceph_cluster, image.spec)
    conn = rados.Rados(conffile=str(ceph_cluster.conf))
    conn.connect()
    try:
        ioctx = conn.open_ioctx("rbd")
        try:
            with rbdlib.Image(ioctx, image.name) as held:  # an open image is a watch, as a VM's is
                addr = next(iter(held.watchers_list()))["addr"]
                err = one_line_error(restore(backups, "latest", image.source, ceph_cluster, check=False))
                assert f"{image.source} is in use" in err and addr in err and "--force" in err, err
                assert export(ceph_cluster, image.spec) == before
                # --force writes it all the same, and says who had it open.
                out = restore(backups, "latest", image.source, ceph_cluster, "--force").stdout.decode()
                assert "other client(s) had it open" in out and addr in out, out
        finally:
            ioctx.close()
    finally:
        conn.shutdown()
    assert export(ceph_cluster, image.spec) == backups.incremental_raw


def _damaged_copy(backups: Backups, tmp_path: Path) -> Path:
    """A copy of the repository whose full backup has its last stored cluster
    damaged (at 21 MiB: the third chunk a restore reads, after it wrote two)."""
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(backups.repo), str(repo)], check=True)
    from engine.repo import Repository

    with Repository.open(str(repo)) as r:
        image = Path(r.image_path(next(b for b in r.backups("vm") if b.id == backups.full)))
    with open_layer(str(image), "qcow2") as layer:
        last = [e for e in layer.allocation() if e.kind == DATA][-1]
    assert last.start >= 16 * MiB
    host = last.host
    _write(image, host + 100, b"\xff" * 16)
    return repo


def test_a_failed_restore_leaves_no_new_image_and_says_an_old_one_is_partly_written(
        backups: Backups, ceph_cluster: CephCluster, tmp_path: Path, made: Callable[[str], str],
        rbd_image: Callable[..., RbdImage]) -> None:
    damaged = Backups(_damaged_copy(backups, tmp_path), backups.full, backups.incremental,
                      backups.full_raw, backups.incremental_raw)
    name = made("failed")
    err = one_line_error(restore(damaged, backups.full, f"rbd:rbd/{name}", ceph_cluster, check=False))
    assert "fails its checksum" in err and "not given the name" in err, err
    assert not [n for n in image_names(ceph_cluster) if name in n]

    image = rbd_image(SIZE)
    err = one_line_error(restore(damaged, backups.full, image.source, ceph_cluster, "--force", check=False))
    assert "fails its checksum" in err and "at offset 22020096" in err, err
    assert f"{image.source} is now partly written (the backup's first 16 MiB" in err, err
    # What it says: the first 16 MiB are the backup's.
    assert export(ceph_cluster, image.spec)[:16 * MiB] == backups.full_raw[:16 * MiB]


def test_a_killed_restores_hidden_image_is_removed_by_the_next(backups: Backups, ceph_cluster: CephCluster,
                                                               made: Callable[[str], str]) -> None:
    import rados
    import rbd as rbdlib

    name = made("killed")
    stale = f".{name}.0123abcd.restoring"  # what a restore killed outright leaves
    live = f".{name}.4567abcd.restoring"  # a restore still running has its image open
    other = made("other")
    others = f".{other}.0123abcd.restoring"  # another name's
    for n in (stale, live, others):
        ceph_cluster.rbd("create", "--size", "1M", f"rbd/{n}")
    conn = rados.Rados(conffile=str(ceph_cluster.conf))
    conn.connect()
    try:
        ioctx = conn.open_ioctx("rbd")
        try:
            with rbdlib.Image(ioctx, live):
                restore(backups, "latest", f"rbd:rbd/{name}", ceph_cluster)
        finally:
            ioctx.close()
    finally:
        conn.shutdown()
    names = image_names(ceph_cluster)
    assert name in names and stale not in names and live in names and others in names
    for n in (live, others):
        ceph_cluster.rbd("rm", "--no-progress", f"rbd/{n}")


def test_a_devices_own_image_needs_force_then_its_next_backup_scans(
        backups: Backups, ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage]) -> None:
    image = rbd_image(SIZE)
    cli("device", "add", backups.repo, "own", image.source, "--ceph-conf", ceph_cluster.conf)
    try:
        cli("backup", backups.repo, "own", "full")
        assert [s["name"] for s in json.loads(rbd(ceph_cluster, "snap", "ls", "--format", "json", image.spec))]
        err = one_line_error(restore(backups, "latest", image.source, ceph_cluster, check=False))
        assert "is the source of device own" in err and "--force" in err, err
        restore(backups, "latest", image.source, ceph_cluster, "--force")
        assert export(ceph_cluster, image.spec) == backups.incremental_raw
        # Its kept snapshot went with the restore: the next backup compares checksums.
        assert json.loads(rbd(ceph_cluster, "snap", "ls", "--format", "json", image.spec)) == []
        out = cli("backup", backups.repo, "own", "incremental").stdout.decode()
        assert "scanned" in out, out
    finally:
        cli("device", "remove", backups.repo, "own", "--force")


def test_an_rbd_devices_backup_restores_to_what_rbd_export_of_its_snapshot_holds(
        ceph_cluster: CephCluster, tmp_path: Path, made: Callable[[str], str],
        rbd_image: Callable[..., RbdImage]) -> None:
    import rados
    import rbd as rbdlib

    image = rbd_image(SIZE)
    conn = rados.Rados(conffile=str(ceph_cluster.conf))
    conn.connect()
    try:
        ioctx = conn.open_ioctx("rbd")
        try:
            with rbdlib.Image(ioctx, image.name) as img:
                img.write(os.urandom(3 * MiB), 2 * MiB + 4096)
                img.write(os.urandom(5000), SIZE - 5000)
        finally:
            ioctx.close()
    finally:
        conn.shutdown()
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "r", image.source, "--ceph-conf", ceph_cluster.conf)
    cli("backup", repo, "r", "full")
    snaps = json.loads(rbd(ceph_cluster, "snap", "ls", "--format", "json", image.spec))
    assert len(snaps) == 1
    name = made("from-rbd")
    cli("restore", repo, "r", "latest", f"rbd:rbd/{name}", "--ceph-conf", ceph_cluster.conf)
    assert export(ceph_cluster, f"rbd/{name}") == export(ceph_cluster, f"{image.spec}@{snaps[0]['name']}")


def test_an_unreachable_cluster_fails_in_bounded_time_with_one_line(tmp_path: Path) -> None:
    """No cluster needed: a configuration naming a monitor nobody runs."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * 65536)
    repo = repo_with_a_full(tmp_path / "repo", "vm", src)
    conf = dead_conf(tmp_path / "dead")
    env = {**os.environ, "BACKUPFS_CEPH_TIMEOUT": "1"}
    started = time.monotonic()
    proc = subprocess.run(backupfs_cmd() + ["restore", str(repo), "vm", "latest", "rbd:rbd/x",
                                            "--ceph-conf", str(conf)], capture_output=True, env=env, timeout=60)
    took = time.monotonic() - started
    err = one_line_error(proc)
    assert "rbd:rbd/x: cannot reach the Ceph cluster" in err and "no monitor answered within 1 s" in err, err
    assert took < 10, took


@pytest.mark.mount
def test_a_mounted_repository_restores_into_an_image_through_the_mount(
        backups: Backups, ceph_cluster: CephCluster, tmp_path: Path, made: Callable[[str], str],
        rbd_image: Callable[..., RbdImage]) -> None:
    from tests.mounts import Mounted

    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(backups.repo), str(repo)], check=True)
    own = rbd_image(SIZE)
    cli("device", "add", repo, "own", own.source, "--ceph-conf", ceph_cluster.conf)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    try:
        m.start()
        mounted = Backups(repo, backups.full, backups.incremental, backups.full_raw, backups.incremental_raw)
        name = made("mounted")
        out = restore(mounted, backups.full[-9:], f"rbd:rbd/{name}", ceph_cluster).stdout.decode()
        assert f"restored {backups.full} of vm to rbd:rbd/{name} through the mount (new RBD image)" in out, out
        assert export(ceph_cluster, f"rbd/{name}") == backups.full_raw
        # A mounted device's image is written through its device file, not behind the mount's back.
        before = export(ceph_cluster, own.spec)
        err = one_line_error(restore(mounted, "latest", own.source, ceph_cluster, "--force", check=False))
        assert f"{own.source} is the source of device own, which is mounted at" in err, err
        assert export(ceph_cluster, own.spec) == before
        m.stop()
    finally:
        m.cleanup()


def test_a_devices_image_made_anew_by_a_restore_becomes_its_source(
        backups: Backups, ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage]) -> None:
    image = rbd_image(SIZE)
    cli("device", "add", backups.repo, "gone", image.source, "--ceph-conf", ceph_cluster.conf)
    try:
        cli("backup", backups.repo, "gone", "full")
        ceph_cluster.remove_image(image)  # the device's image is lost
        err = one_line_error(restore(backups, "latest", image.source, ceph_cluster, check=False))
        assert "is the source of device gone" in err, err
        out = restore(backups, "latest", image.source, ceph_cluster, "--force").stdout.decode()
        assert "(new RBD image)" in out, out
        # Bound to the new image (another id): it backs up, comparing checksums.
        out = cli("backup", backups.repo, "gone", "incremental").stdout.decode()
        assert "scanned" in out, out
    finally:
        cli("device", "remove", backups.repo, "gone", "--force")
