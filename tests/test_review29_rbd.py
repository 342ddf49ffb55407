"""Review 29: an RBD backup's snapshot taken in a thread (``RbdSnapshots.begin``
/ ``Taking.wait``) beside the image's check, against the stops (Ctrl-C, the
CLI's SIGTERM) that land while it is being made.

Each stop here is a real signal sent to the thread running the backup, at a
chosen point, never an exception raised by a stand-in: what the mask holds
back and where Python raises it is what is under test.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.rbdsnaps import RbdSnapshots, Taking
from engine.repo import Repository
from tests.cephcluster import CephCluster, RbdImage
from tests.test_rbd_backup_steps import MiB, after_a_full, in_call, wait_for, write
from tests.test_rbd_source import snapshots



def name_taken_first(cluster: CephCluster, image: RbdImage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first snapshot name a backup asks for is made first by someone
    else (``rbd snap create``: another repository backing up the image in
    the same second); the list it returns holds that name once asked."""
    from engine.rbdimage import RbdImage as Handle

    create = Handle.create_snapshot
    taken: list[str] = []

    def create_taken(self: Handle, name: str) -> None:
        if not taken:
            taken.append(name)
            cluster.rbd("snap", "create", f"{image.spec}@{name}")
        create(self, name)

    monkeypatch.setattr(Handle, "create_snapshot", create_taken)
    return taken



def stopped_backup(repo: Repository) -> None:
    """An incremental of device vm that a stop ends, as Ctrl-C ends the CLI's."""
    with pytest.raises(KeyboardInterrupt):
        repo.backup("vm", "incremental")


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this test (as in the CLI), whatever the runner set."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_the_backup_waits_for_its_snapshot_removes_the_snapshot(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ctrl_c: None) -> None:
    """Ctrl-C while the main thread waits for the snapshot (the likeliest
    moment: the check beside it is a fifth of the snapshot's time). The wait
    holds it back until the snapshot is made, as it says, so the backup knows
    the snapshot exists and its undo removes it. On HEAD the held stop is
    raised by the unmasking call itself, before ``made`` is set: the undo
    thinks there is no snapshot and leaves it on the image."""
    from engine.rbdimage import RbdImage as Handle

    create = Handle.create_snapshot
    main = threading.main_thread()

    def create_after_a_stop(self: Handle, name: str) -> None:
        # Inside Future.exception: past wait()'s SIG_BLOCK, so the signal is held.
        wait_for(lambda: in_call(main, "wait") and in_call(main, "exception"), "the backup waiting")
        signal.pthread_kill(main.ident or 0, signal.SIGINT)
        create(self, name)

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        monkeypatch.setattr(Handle, "create_snapshot", create_after_a_stop)
        stopped_backup(repo)
        monkeypatch.undo()
        assert snapshots(ceph_cluster, image) == [f"backupfs-{full}"], "the stopped backup's snapshot stayed"
        assert [row.backup for row in repo.catalog.rbd_snapshots("vm")] == [full]


def test_a_ctrl_c_beside_the_snapshot_is_not_lost_to_a_name_taken_already(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ctrl_c: None) -> None:
    """Ctrl-C lands while the image is checked, and the snapshot's name is
    taken already (another repository backing up the image in the same
    second: the case the retry is for). The user asked to stop: the backup
    must stop. On HEAD the wait's EEXIST, raised in the finally, replaces the
    KeyboardInterrupt, ``_take_rbd_named`` retries under the next number and
    the backup runs to its end."""
    from engine.rbddevice import RbdDevice

    checked = RbdDevice.checked_snapshots
    main = threading.main_thread()
    stopped: list[bool] = []

    def check_then_stop(self: RbdDevice) -> dict[str, int]:
        listed = checked(self)
        if not stopped:
            stopped.append(True)
            signal.pthread_kill(main.ident or 0, signal.SIGINT)  # raised at the next statement
        return listed

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        taken = name_taken_first(ceph_cluster, image, monkeypatch)
        monkeypatch.setattr(RbdDevice, "checked_snapshots", check_then_stop)
        try:
            stopped_backup(repo)
        finally:
            monkeypatch.undo()
        assert stopped and taken
        # The other's snapshot stays (never ours); ours is not there.
        assert sorted(snapshots(ceph_cluster, image)) == sorted([f"backupfs-{full}", taken[0]])
        assert [row.backup for row in repo.catalog.rbd_snapshots("vm")] == [full]
        assert len(repo.catalog.backups("vm")) == 1


def test_a_stop_just_after_the_snapshot_is_begun_waits_for_it_and_removes_it(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ctrl_c: None) -> None:
    """A stop landing as ``begin`` returns, before ``_take_rbd``'s try is
    entered (a few statements: the same hole start() closes for the job's
    registration by holding stops). On HEAD nothing waits for the thread:
    the undo runs, the snapshot is made after it and stays, and the thread
    may still be inside librbd's create_snap on the head handle while the
    CLI goes on to close that handle and the connection."""
    from engine.rbdimage import RbdImage as Handle

    init, create = Taking.__init__, Handle.create_snapshot
    main = threading.main_thread()
    backup_ran = threading.Event()
    created = threading.Event()

    def init_then_stop(self: Taking, snaps: RbdSnapshots, name: str) -> None:
        init(self, snaps, name)
        signal.pthread_kill(main.ident or 0, signal.SIGINT)  # raised at the next statement unless held

    def slow_create(self: Handle, name: str) -> None:
        # Made only once the backup has either waited for it or given up.
        wait_for(lambda: backup_ran.is_set() or in_call(main, "exception"), "the backup waiting or gone")
        try:
            create(self, name)
        finally:
            created.set()

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        monkeypatch.setattr(Taking, "__init__", init_then_stop)
        monkeypatch.setattr(Handle, "create_snapshot", slow_create)
        try:
            stopped_backup(repo)
        finally:
            backup_ran.set()
            assert created.wait(30), "the snapshot's thread never ended"
            monkeypatch.undo()
        assert snapshots(ceph_cluster, image) == [f"backupfs-{full}"], "the stopped backup's snapshot stayed"
        assert [row.backup for row in repo.catalog.rbd_snapshots("vm")] == [full]


def test_a_requested_scan_and_a_missing_base_still_compare_with_the_chain(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """Sanity (passes on HEAD): plan no longer knows whether an RBD
    incremental scans; the scan decided beside the snapshot still loads the
    chain's checksums (stores only what differs) and says why."""
    from tests.test_rbd_source import assert_backup_is, export

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, repo_dir, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        asked = repo.backup("vm", "incremental", scan=True)
        assert asked.scanned and asked.scan_reason == "requested"
        assert asked.bytes_written == 64 * 1024  # compared: only the changed cluster stored
        repo.device("vm").settle()  # type: ignore[attr-defined]
        ceph_cluster.rbd("snap", "rm", "--no-progress", f"{image.spec}@backupfs-{asked.record.id}")
        write(ceph_cluster, image, 3 * MiB, 64 * 1024)
        diff = repo.backup("vm", "differential")
        assert diff.scanned and "is missing" in (diff.scan_reason or ""), diff.scan_reason
        assert diff.bytes_written == 2 * 64 * 1024  # against the full: both changes, nothing else
        assert_backup_is(repo_dir, diff.record.id,
                         export(ceph_cluster, image, f"backupfs-{diff.record.id}", tmp_path / "d.raw"))


def test_a_name_taken_already_is_retried_under_the_next_number_and_left_alone(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sanity (passes on HEAD; no other test reaches the retry): the thread's
    EEXIST forgets the intent, the next number is tried, and the other's
    snapshot is neither recorded nor removed, now or by the next backup."""
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        taken = name_taken_first(ceph_cluster, image, monkeypatch)
        inc = repo.backup("vm", "incremental")
        monkeypatch.undo()
        assert taken and f"backupfs-{inc.record.id}" != taken[0]
        assert not inc.scanned and inc.bytes_written == 64 * 1024
        repo.device("vm").settle()  # type: ignore[attr-defined]
        assert sorted(snapshots(ceph_cluster, image)) == sorted([taken[0], f"backupfs-{inc.record.id}"])
        assert [row.backup for row in repo.catalog.rbd_snapshots("vm")] == [inc.record.id]
        again = repo.backup("vm", "incremental", allow_empty=True)
        repo.device("vm").settle()  # type: ignore[attr-defined]
        assert taken[0] in snapshots(ceph_cluster, image), "another's snapshot was removed"
        assert f"backupfs-{again.record.id}" in snapshots(ceph_cluster, image)
