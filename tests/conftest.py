"""Fixtures only: what a test receives by naming a parameter.

The helpers tests call live in modules of this package (tests.oracle,
tests.commands, tests.mounts, tests.pagecache, tests.users, tests.hostile_qcow2), imported by
name; one name means one thing here (``repo`` is always a Repository open in
this process; a repository's directory is ``repo_dir``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.repo import Repository
from tests.cephcluster import CephCluster, CephError, RbdImage
from tests.s3remote import S3Remote
from tests.hostile_qcow2 import Img, build
from tests.mounts import STARTED_MOUNTS
from tests.users import OtherUser

# The markers kept honest: a test that mounts without `mount` fails
# (tests/mount_guard.py); unmarked tests over ten seconds are listed at the
# end of the run (tests/long_marker.py).
pytest_plugins = ["tests.mount_guard", "tests.long_marker"]


@pytest.fixture(params=["c", "python"])
def read_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a chain test with the C read loop and index sweep, and again with Python and numpy.

    The C ones must be there: setup.py builds them, and the install script
    installs gcc, so a missing build is a failure, not a quiet fallback.
    """
    import engine.chain

    if request.param == "c":
        from engine import _chainindex, _fastread  # noqa: F401  (fails the test if not built)

        assert engine.chain._fastread is not None, "engine._fastread is built but chain.py does not use it"
        assert engine.chain._chainindex is not None, "engine._chainindex is built but chain.py does not use it"
    else:
        monkeypatch.setattr(engine.chain, "_fastread", None)
        monkeypatch.setattr(engine.chain, "_chainindex", None)
    return str(request.param)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """An empty repository opened in this process, closed after the test
    (a test that drives the CLI or a mount names the directory it makes one in
    ``repo_dir``, never ``repo``)."""
    Repository.init(str(tmp_path / "repo"))
    r = Repository.open(str(tmp_path / "repo"))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A directory for QEMU's raw conversions (on /dev/shm when there is room)."""
    return tmp_path


@pytest.fixture(scope="module")
def std_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build(tmp_path_factory.mktemp("std") / "std.qcow2").read_bytes()


@pytest.fixture
def std(tmp_path: Path, std_bytes: bytes) -> Img:
    """64 KiB, 4 KiB clusters: data at 0, zeros at 8k, compressed at 16k, data at 20k.

    Layout (QEMU 7.2): header 0x0, refcount table 0x1000, refcount block
    0x2000, L1 0x3000, L2 0x4000, data 0x5000, compressed 0x6000, data 0x7000.
    """
    path = tmp_path / "std.qcow2"
    path.write_bytes(std_bytes)
    return Img(path)


@pytest.fixture(autouse=True)
def daemon_logs_clean() -> Iterator[None]:
    """Fail a test whose daemon logged a traceback the test did not ask for.

    A handler turns an unexpected exception into EIO and logs it: the user
    sees one failed request, a test's assertions may not, the log does (the
    idea of s3ql's tests/pytest_checklogs.py). Checked after the test's own
    fixtures have unmounted, so the log is complete.
    """
    first = len(STARTED_MOUNTS)
    yield
    started = STARTED_MOUNTS[first:]
    del STARTED_MOUNTS[first:]
    for m in started:
        log = m.log()
        if not m.expect_tracebacks and "Traceback" in log:
            at = log.index("Traceback")
            pytest.fail(f"the daemon serving {m.repo} logged a traceback:\n{log[max(0, at - 2000) : at + 4000]}")


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A fresh system user with no home and no shell, removed after the session."""
    name = f"bfstest{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield OtherUser(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def open_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory another user can reach and list (tmp_path's parents are
    root's 0700 directories), removed after the test."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="bfs-open-", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def user_dir(open_tmp: Path, other_user: OtherUser) -> Path:
    """A directory the other user owns: where they keep their disks, and plant things."""
    d = open_tmp / "user"
    d.mkdir()
    os.chown(d, other_user.uid, other_user.gid)
    return d


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A throwaway one-node Ceph cluster (mon, memstore OSD) for the whole session.

    Started once (about 2 s), stopped at the end even when tests failed; with
    xdist each worker has its own. Pools `rbd` (with namespace `ns1`) and
    `backupfs-b`, and radosgw's S3 endpoint (for ``s3_remote``). A test using it
    is marked `ceph` and `long` at collection (tests/long_marker.py), so the
    quick run never starts one.
    """
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"), rgw=True).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3_remote(ceph_cluster: CephCluster) -> Iterator[S3Remote]:
    """A fresh bucket on the session cluster's radosgw, with the credentials and
    endpoint in ``env`` for the commands a test runs (never in this process's
    os.environ); the bucket and everything in it is removed after the test."""
    remote = S3Remote.make(ceph_cluster)
    try:
        yield remote
    finally:
        remote.remove()


@pytest.fixture(scope="module")
def module_s3_remote(ceph_cluster: CephCluster) -> Iterator[S3Remote]:
    """As ``s3_remote``, one bucket for a whole module: for tests that only read
    what one pushed repository put there (a module overrides ``s3_remote`` with it)."""
    remote = S3Remote.make(ceph_cluster)
    try:
        yield remote
    finally:
        remote.remove()


@pytest.fixture
def rbd_image(ceph_cluster: CephCluster) -> Iterator[Callable[..., RbdImage]]:
    """Makes images in the session's cluster: ``rbd_image(size, pool="rbd", namespace="")``
    returns a new, uniquely named image; each is removed with its snapshots after the test
    (a removal that fails, e.g. an image still open, fails the teardown)."""
    made: list[RbdImage] = []

    def make(size: int, pool: str = "rbd", namespace: str = "") -> RbdImage:
        image = ceph_cluster.create_image(size, pool, namespace)
        made.append(image)
        return image

    yield make
    errors = []
    for image in made:
        try:
            ceph_cluster.remove_image(image)
        except CephError as e:
            errors.append(str(e))
    if errors:
        raise CephError("\n".join(errors))
