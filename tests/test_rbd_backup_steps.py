"""An RBD backup's steps that run beside one another, in a process that lives on (a mount's daemon).

- The older snapshot's removal (a monitor's round) runs after the backup has
  answered; the device's next backup and its close wait for it, so exactly one
  snapshot is kept all the same.
- The image is checked by its name while the snapshot is taken: an image
  replaced or resized behind the process's back is still refused, and the
  snapshot taken meanwhile does not stay.
- One handle reads every backup's snapshot in turn: each backup its own.
- No thread librados or librbd starts takes a stop signal meant for the main thread.

Against the session's real cluster; `rbd snap ls` says what is left on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.device import DeviceError
from engine.rbdsnaps import RbdSnapshots
from engine.stopsignals import STOP_SIGNALS
from engine.repo import Repository
from tests.cephcluster import CephCluster, RbdImage
from tests.test_rbd_source import assert_backup_is, export, opened, snapshots
from tests.test_review25_rbd import make_repo

MiB = 1024 * 1024
# How long a step that should be prompt may take before the test says it hung.
PROMPT = 30.0


class HeldRemoval:
    """The older snapshots' removal (``RbdSnapshots.keep_only``) held from
    ``hold()`` on until ``release`` is set; ``removing`` says it has begun."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.removing, self.release = threading.Event(), threading.Event()
        self.keep_only = RbdSnapshots.keep_only

    def hold(self) -> None:
        keep_only, removing, release = self.keep_only, self.removing, self.release

        def held(snaps: RbdSnapshots, backup_id: str) -> bool:
            removing.set()
            release.wait(PROMPT)
            return keep_only(snaps, backup_id)

        self.monkeypatch.setattr(RbdSnapshots, "keep_only", held)

    def let_go(self) -> None:
        """Removals from now on run at once (one already held still waits for ``release``)."""
        self.monkeypatch.setattr(RbdSnapshots, "keep_only", self.keep_only)


def in_call(thread: threading.Thread | int | None, function: str) -> bool:
    """Whether ``thread`` (or the thread of that ident) is inside a call of ``function`` now."""
    ident = thread.ident if isinstance(thread, threading.Thread) else thread
    frame = sys._current_frames().get(ident) if ident is not None else None
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Until ``condition()`` holds (looked at every few ms), failing after PROMPT seconds."""
    deadline = time.monotonic() + PROMPT
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {PROMPT:g} s"
        time.sleep(0.005)


def write(cluster: CephCluster, image: RbdImage, offset: int, size: int = 4096) -> None:
    """Another librbd client writes the image, as a VM would."""
    with opened(cluster, image) as img:
        img.write(os.urandom(size), offset)


@contextlib.contextmanager
def after_a_full(cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path
                 ) -> Iterator[tuple[Repository, Path, RbdImage, str]]:
    """An 8 MiB image with data, its repository open in this process (as a
    daemon's), a full backup of it taken: (repository, its path, image, full's id)."""
    image = rbd_image(8 * MiB)
    repo_dir = make_repo(tmp_path, cluster, image)
    write(cluster, image, 0, MiB)
    with Repository.open(str(repo_dir)) as repo:
        yield repo, repo_dir, image, repo.backup("vm", "full").record.id


def test_the_backup_answers_before_the_older_snapshot_is_removed_and_one_is_kept(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldRemoval(monkeypatch)
    removing, release = held.removing, held.release
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, repo_dir, image, full):
        write(ceph_cluster, image, 2 * MiB)
        held.hold()
        answered: list[str] = []
        first = threading.Thread(target=lambda: answered.append(repo.backup("vm", "incremental").record.id))
        first.start()
        try:
            assert removing.wait(PROMPT), "the backup never came to removing the older snapshot"
            first.join(PROMPT)
            assert not first.is_alive(), "the backup waited for the older snapshot's removal to answer"
            inc = answered[0]
            # The window: the new backup is there, its snapshot and the older one both.
            assert sorted(snapshots(ceph_cluster, image)) == sorted([f"backupfs-{full}", f"backupfs-{inc}"])
            write(ceph_cluster, image, 3 * MiB)
            # The next backup waits for the removal (its plan settles it first).
            second: list[str] = []
            after = threading.Thread(target=lambda: second.append(repo.backup("vm", "incremental").record.id))
            after.start()
        finally:
            release.set()
            first.join(PROMPT)
        after.join(PROMPT)
        assert not after.is_alive()
        inc2 = second[0]
        repo.device("vm").settle()  # type: ignore[attr-defined]
        assert snapshots(ceph_cluster, image) == [f"backupfs-{inc2}"]
        write(ceph_cluster, image, 4 * MiB)
        held.let_go()
        inc3 = repo.backup("vm", "incremental").record.id
    # Closed: its removal done before close returned.
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc3}"]
    assert_backup_is(repo_dir, inc3, export(ceph_cluster, image, f"backupfs-{inc3}", tmp_path / "inc3.raw"))


def test_a_failing_removal_after_the_answer_is_retried_by_the_next_backup(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """The removal after the answer meets a protected snapshot (an admin cloning
    from it): the backup stands, the snapshot stays until it can go."""
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        held = f"{image.spec}@backupfs-{full}"
        ceph_cluster.rbd("snap", "protect", held)
        try:
            write(ceph_cluster, image, 2 * MiB)
            inc = repo.backup("vm", "incremental").record.id
            repo.device("vm").settle()  # type: ignore[attr-defined]
            assert sorted(snapshots(ceph_cluster, image)) == sorted([f"backupfs-{full}", f"backupfs-{inc}"])
        finally:
            ceph_cluster.rbd("snap", "unprotect", held)
        write(ceph_cluster, image, 3 * MiB)
        inc2 = repo.backup("vm", "incremental").record.id
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc2}"]


@pytest.mark.parametrize("change", ["replaced", "resized"])
def test_an_image_changed_behind_a_long_running_process_is_refused_and_its_snapshot_goes(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path, change: str) -> None:
    """The check by name runs while the snapshot is taken: refused all the same,
    with the snapshot it took removed and the kept one untouched."""
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        moved = f"{image.spec}-moved"
        if change == "replaced":
            ceph_cluster.rbd("rename", image.spec, moved)
            ceph_cluster.rbd("create", "--size", "8M", image.spec)
            watched = moved
        else:
            ceph_cluster.rbd("resize", "--no-progress", "--size", "16M", image.spec)
            watched = image.spec
        try:
            with pytest.raises(DeviceError) as failed:
                repo.backup("vm", "incremental")
            said = str(failed.value)
            assert ("changed size" in said) if change == "resized" else ("now leads to" in said), said
            assert "\n" not in said
            kept = [s["name"] for s in json.loads(ceph_cluster.rbd("snap", "ls", "--format", "json", watched))]
            assert kept == [f"backupfs-{full}"], "the refused backup's snapshot stayed"
            assert [b.id for b in repo.backups("vm")] == [full]
        finally:
            if change == "replaced":
                repo.close()
                ceph_cluster.rbd("snap", "purge", "--no-progress", moved)
                ceph_cluster.rbd("rm", "--no-progress", moved)


def test_the_snapshot_is_taken_while_the_image_is_checked_and_its_handle_is_left_alone(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot (a monitor's round) is taken in a thread while the backup
    checks the image by its name, finds the snapshot to diff from and loads
    the chain's checksums: the snapshot's making waits here until the check
    is under way, which, one after the other, it never would be. Nothing is
    asked meanwhile of the handle making it (its size or its snapshots,
    asked then, made it read the image's header again mid-way)."""
    from engine.rbddevice import RbdDevice
    from engine.rbdimage import RbdImage as Handle

    create, checked = Handle.create_snapshot, RbdDevice.checked_snapshots
    main = threading.main_thread()
    making: set[int] = set()  # ids of the handles making a snapshot now
    asked: list[str] = []  # what was asked of such a handle meanwhile

    def slow_create(self: Handle, name: str) -> None:
        wait_for(lambda: in_call(main, "slow_check"), "the image checked by name meanwhile")
        making.add(id(self))
        try:
            create(self, name)
        finally:
            making.discard(id(self))

    def noted(method: str) -> Callable[..., object]:
        original = getattr(Handle, method)

        def call(self: Handle, *args: object) -> object:
            if id(self) in making:
                asked.append(method)
            return original(self, *args)
        return call

    def slow_check(self: RbdDevice) -> dict[str, int]:
        listed = checked(self)
        wait_for(lambda: bool(making), "the snapshot being made while the check runs")
        return listed

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, repo_dir, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        monkeypatch.setattr(Handle, "create_snapshot", slow_create)
        monkeypatch.setattr(RbdDevice, "checked_snapshots", slow_check)
        for method in ("size", "snapshots", "set_snapshot", "snapshot_id", "image_id"):
            monkeypatch.setattr(Handle, method, noted(method))
        result = repo.backup("vm", "incremental")
        monkeypatch.undo()
        assert not result.scanned, result.scan_reason  # the full's snapshot found by the check's listing
        assert asked == []
        assert result.bytes_written == 64 * 1024
        repo.device("vm").settle()  # type: ignore[attr-defined]
        assert snapshots(ceph_cluster, image) == [f"backupfs-{result.record.id}"]
        assert_backup_is(repo_dir, result.record.id, export(ceph_cluster, image, f"backupfs-{result.record.id}",
                                                             tmp_path / "inc.raw"))


def test_a_failure_beside_the_snapshot_waits_for_it_then_removes_it(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails (here: the catalog cannot load the chain's checksums)
    while the snapshot is still being made: the backup waits for it before it
    undoes anything, so the snapshot made after the failure is removed, not
    left behind. The making is held until the backup either waits for it or
    has already tried to remove it, so without the wait it would stay."""
    from engine.rbdimage import RbdImage as Handle
    from engine.rbdsnaps import Taking

    create, drop = Handle.create_snapshot, RbdSnapshots.drop
    main = threading.main_thread()
    dropping = threading.Event()

    def waiting() -> bool:
        frame = sys._current_frames().get(main.ident or 0)
        while frame is not None:
            if frame.f_code.co_name == "wait" and isinstance(frame.f_locals.get("self"), Taking):
                return True
            frame = frame.f_back
        return False

    def late_create(self: Handle, name: str) -> None:
        wait_for(lambda: dropping.is_set() or waiting(), "the backup waiting for its snapshot")
        create(self, name)

    def noted_drop(self: RbdSnapshots, name: str, snap_id: int | None) -> bool:
        dropping.set()
        return drop(self, name, snap_id)

    def failing_hashes(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        write(ceph_cluster, image, 2 * MiB, 64 * 1024)
        monkeypatch.setattr(Handle, "create_snapshot", late_create)
        monkeypatch.setattr(RbdSnapshots, "drop", noted_drop)
        monkeypatch.setattr(Repository, "chain_hashes", failing_hashes)
        with pytest.raises(OSError):
            repo.backup("vm", "incremental")
        monkeypatch.undo()
        assert dropping.is_set(), "the made snapshot was never removed"
        assert snapshots(ceph_cluster, image) == [f"backupfs-{full}"], "the failed backup's snapshot stayed"
        assert [row.backup for row in repo.catalog.rbd_snapshots("vm")] == [full]
        write(ceph_cluster, image, 3 * MiB, 64 * 1024)
        after = repo.backup("vm", "incremental")
        assert not after.scanned and after.bytes_written == 2 * 64 * 1024


def test_backups_in_one_process_each_read_their_own_snapshot_through_one_reader(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """The daemon's one reader is set to each backup's snapshot in turn: each
    backup holds its own point in time, not the reader's previous one."""
    image = rbd_image(4 * MiB)
    repo_dir = make_repo(tmp_path, ceph_cluster, image)
    write(ceph_cluster, image, 0, MiB)
    with Repository.open(str(repo_dir)) as repo:
        dev = repo.device("vm")
        readers = []
        for n, kind in enumerate(("full", "incremental", "incremental", "differential")):
            write(ceph_cluster, image, n * MiB, 64 * 1024)
            rec = repo.backup("vm", kind).record
            readers.append(dev.reader)  # type: ignore[attr-defined]
            assert_backup_is(repo_dir, rec.id, export(ceph_cluster, image, f"backupfs-{rec.id}",
                                                      tmp_path / f"{rec.id}.raw"))
        assert readers[0] is not None and all(r is readers[0] for r in readers)


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _blocked_signals(tid: int) -> int | None:
    """The thread's blocked-signal mask (SigBlk), or None if it has exited."""
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)
    except FileNotFoundError:
        return None
    return None


def test_no_thread_of_librados_or_librbd_takes_a_stop_signal(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """A Ctrl-C or SIGTERM goes to any thread that does not block it, and Python
    then raises it in the main thread at once, even where the main thread holds
    stops back (a backup's job registered but not yet inside the try that undoes
    it). So the connection's and the images' threads must block them, as every
    thread backupfs starts does (engine/stopsignals.py)."""
    # No librbd client of the test's own in this process (``write`` opens one,
    # with its own threads): only backupfs's connection starts threads here.
    repo_dir = make_repo(tmp_path, ceph_cluster, rbd_image(8 * MiB))
    before = _tasks()
    with Repository.open(str(repo_dir)) as repo:
        repo.backup("vm", "full")
        repo.backup("vm", "incremental", allow_empty=True)
        new = _tasks() - before
        assert new, "opening the device started no thread: nothing checked"
        stops = sum(1 << (int(s) - 1) for s in STOP_SIGNALS)
        taking = sorted(t for t in new if (m := _blocked_signals(t)) is not None and m & stops != stops)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in taking]
        assert not taking, f"threads that would take a Ctrl-C: {names}"
