"""The throwaway Ceph cluster the RBD tests stand on (tests/cephcluster.py).

If it serves wrong data, leaks daemons or cannot be reached from the venv,
every RBD test above it fails for the wrong reason; these tests fail first
and name the cause. All but the first start or use a real cluster (`ceph`,
`long`); the first checks the install and costs an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import tests.cephcluster
from tests.cephcluster import NAMESPACE, SECOND_POOL, CephCluster, CephError, RbdImage, dead_conf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ceph-test-cluster"
DEBIAN = Path("/usr/lib/python3/dist-packages")


def test_bindings_import_in_the_venv() -> None:
    """scripts/install links Debian's rados and rbd modules into the venv (a broken install fails here)."""
    import rados
    import rbd

    assert sys.prefix != sys.base_prefix, "the tests run from the venv (.venv/bin/python)"
    for module in (rados, rbd):
        assert Path(module.__file__).resolve().parent == DEBIAN, module.__file__


def _pattern(size: int, seed: int) -> bytes:
    """`size` bytes that differ at every offset and between seeds (a misplaced block shows)."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def _write_with_bindings(cluster: CephCluster, image: RbdImage, writes: list[tuple[int, bytes]]) -> None:
    """Write through librbd's Python bindings, as the engine will."""
    import rados
    import rbd

    with rados.Rados(conffile=str(cluster.conf)) as conn, conn.open_ioctx(image.pool) as io:
        io.set_namespace(image.namespace)
        with rbd.Image(io, image.name) as img:
            for offset, data in writes:
                assert img.write(data, offset) == len(data)
            img.flush()


def _export(cluster: CephCluster, image: RbdImage, path: Path) -> bytes:
    cluster.rbd("export", "--no-progress", image.spec, str(path))
    return path.read_bytes()


def _alive(pid: int, conf: Path) -> bool:
    """Whether `pid` is still a process of ours: it exists, is no zombie, and runs with `conf`."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and os.fsencode(conf) in cmdline


def _processes_using(conf: Path) -> list[int]:
    """Every live (non-zombie) process whose command line names `conf`."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _alive(int(p.name), conf)]


@pytest.mark.parametrize("where", ["rbd", SECOND_POOL, f"rbd/{NAMESPACE}"])
@pytest.mark.ceph
@pytest.mark.long
def test_written_data_is_what_rbd_exports(ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage],
                                          tmp_path: Path, where: str) -> None:
    """Unaligned writes through the bindings read back byte for byte from `rbd export`,
    in the default pool, the second pool and the namespace."""
    pool, _, namespace = where.partition("/")
    size = 12 << 20
    image = rbd_image(size, pool=pool, namespace=namespace)
    expected = bytearray(size)
    # Across a 4 MiB object boundary, a sector-unaligned offset, and the last byte.
    writes = [((4 << 20) - 3000, _pattern(9000, 1)), (513, _pattern(70000, 2)), (size - 1, b"\xff")]
    for offset, data in writes:
        expected[offset:offset + len(data)] = data
    _write_with_bindings(ceph_cluster, image, writes)

    assert _export(ceph_cluster, image, tmp_path / "export") == expected
    listed = ceph_cluster.rbd("ls", "--format", "json", where).strip()
    assert image.name in json.loads(listed)
    # The namespace is its own: the image is not in the pool's default namespace.
    if namespace:
        assert image.name not in json.loads(ceph_cluster.rbd("ls", "--format", "json", pool))


def test_a_live_clients_watch_stays_up_past_the_watch_timeout(ceph_cluster: CephCluster,
                                                               rbd_image: Callable[..., RbdImage]) -> None:
    """The cluster times out a killed client's watch in 2 s (so its image's
    lock is free soon); a live client's watch must stay up all the same.
    With librados pinging every 5 s, each watch was dropped 2 s after its
    ping and made again under a new cookie, and in that moment another
    client wanting the image's lock broke it and blocklisted the owner.
    Watched for longer than a ping interval plus the timeout: the one watch
    keeps its cookie throughout."""
    import rados
    import rbd

    image = rbd_image(4 * 1024 * 1024)
    with rados.Rados(conffile=str(ceph_cluster.conf)) as conn, conn.open_ioctx(image.pool) as io:
        io.set_namespace(image.namespace)
        with rbd.Image(io, image.name) as img:
            first = [w["cookie"] for w in img.watchers_list()]
            assert len(first) == 1, first
            # A time-based property: watched, not waited on. 5 s of pings plus 2 s of timeout.
            deadline = time.monotonic() + 7.5
            while time.monotonic() < deadline:
                now = [w["cookie"] for w in img.watchers_list()]
                assert now == first, f"the live watch was dropped and made again: {first} then {now}"
                time.sleep(0.25)


@pytest.mark.ceph
@pytest.mark.long
def test_rbd_image_removes_its_image_and_snapshots(ceph_cluster: CephCluster) -> None:
    """The image fixture's removal takes snapshots with it (backups leave one behind)."""
    image = ceph_cluster.create_image(1 << 20)
    ceph_cluster.rbd("snap", "create", f"{image.spec}@backupfs-1")
    ceph_cluster.remove_image(image)
    assert image.name not in json.loads(ceph_cluster.rbd("ls", "--format", "json", "rbd"))


@pytest.mark.ceph
@pytest.mark.long
def test_stop_leaves_none_of_its_processes(tmp_path: Path) -> None:
    """A cluster of its own: started, used, stopped twice; none of its daemons outlives stop()."""
    cluster = CephCluster(tmp_path / "c")
    t0 = time.monotonic()
    cluster.start()
    try:
        started = time.monotonic() - t0
        pids = cluster.pids
        assert set(pids) == {"mon", "osd"}
        assert all(_alive(pid, cluster.conf) for pid in pids.values())
        assert cluster.mon_addr in cluster.conf.read_text()
        cluster.rbd("create", "--size", "1M", "rbd/x")
        assert cluster.rbd("ls", "rbd").split() == ["x"]
    finally:
        t1 = time.monotonic()
        cluster.stop()
        stopped = time.monotonic() - t1
    cluster.stop()  # a second stop does nothing
    print(f"start {started:.2f} s, stop {stopped:.2f} s")
    # Our own children are reaped by stop(): not even a zombie is left.
    assert [pid for pid in pids.values() if Path(f"/proc/{pid}").exists() and _alive(pid, cluster.conf)] == []
    assert _processes_using(cluster.conf) == []
    assert not (cluster.directory / "daemons.json").exists()


@pytest.mark.ceph
@pytest.mark.long
def test_a_start_that_is_not_ready_in_time_fails_and_cleans_up(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A start past its bound raises with the daemons' log tails and leaves no daemon."""
    monkeypatch.setattr(tests.cephcluster, "START_SECONDS", 0.4)  # a start takes about 2 s
    cluster = CephCluster(tmp_path / "c")
    with pytest.raises(CephError) as failed:
        cluster.start()
    message = str(failed.value)
    assert message.startswith(f"the cluster in {cluster.directory} did not start: "), message
    assert "--- mon.a.log:" in message, message
    cluster.stop()  # safe after a failed start
    assert _processes_using(cluster.conf) == []


@pytest.mark.ceph
@pytest.mark.long
def test_script_starts_and_stops_a_cluster_with_radosgw(tmp_path: Path) -> None:
    """`scripts/ceph-test-cluster start DIR --rgw` returns once RBD and S3 answer; a second
    start is refused; `stop DIR` from another process stops every daemon it started."""
    d = tmp_path / "c"
    start = subprocess.run([str(SCRIPT), "start", str(d), "--rgw"], capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr
        lines = start.stdout.splitlines()
        conf = Path(lines[0])
        info = dict(line.split(" ", 1) for line in lines[1:])
        record = json.loads((d / "daemons.json").read_text())
        assert set(record["pids"]) == {"mon", "osd", "rgw"}
        assert conf == d / "ceph.conf" and info["endpoint"] == record["endpoint"]

        env = {**os.environ, "CEPH_CONF": str(conf)}
        subprocess.run(["rbd", "create", "--size", "1M", "rbd/y"], env=env, check=True, timeout=60)
        with urllib.request.urlopen(info["endpoint"], timeout=30) as answer:
            assert b"ListAllMyBucketsResult" in answer.read()
        user = json.loads(subprocess.run(["radosgw-admin", "user", "info", "--uid=test"], env=env, check=True,
                                         capture_output=True, timeout=60).stdout)
        assert {"access_key": info["access_key"], "secret_key": info["secret_key"]}.items() <= \
            user["keys"][0].items()

        again = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "a cluster already runs in" in again.stderr, again.stderr
    finally:
        stop = subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    # Not our children: PID 1 reaps them, maybe later; a zombie is stopped.
    assert [pid for pid in record["pids"].values() if _alive(pid, conf)] == []
    assert _processes_using(conf) == []
    assert subprocess.run([str(SCRIPT), "stop", str(d)], timeout=60).returncode == 0


@pytest.mark.ceph
@pytest.mark.long
@pytest.mark.parametrize("seconds", [1, 3])
def test_an_unreachable_cluster_fails_within_the_mount_timeout(tmp_path: Path, seconds: int) -> None:
    """With client_mount_timeout (and rados_mon_op_timeout) set, connecting to a mon nobody
    serves fails with TimedOut after that many seconds (Rados.connect's own timeout
    argument is ignored in this version: without the option a client waits 300 s)."""
    import rados

    conf = dead_conf(tmp_path)
    conn = rados.Rados(conffile=str(conf), conf={"client_mount_timeout": str(seconds),
                                                 "rados_mon_op_timeout": str(seconds)})
    t0 = time.monotonic()
    try:
        with pytest.raises(rados.TimedOut):
            conn.connect()
        took = time.monotonic() - t0
    finally:
        conn.shutdown()
    print(f"client_mount_timeout {seconds}: failed after {took:.2f} s")
    assert seconds - 0.1 <= took <= seconds + 2.0
