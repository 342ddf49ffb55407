"""An RBD device's backup steps that run beside one another (engine/rbddevice.py):
what a stop, a close and a restore meet while they do.

- The older snapshot's removal runs in a thread after the backup answers; a
  close waits for it. A Ctrl-C (or the CLI's SIGTERM) landing during that
  wait must not end the wait early: the close then went on (or the
  repository's close after it) with the removal still using the device's
  image and the catalog, which a closed connection makes fail (or crash).
- One process holding the image (its head and its reader) is one client to
  a restore that says who has the image open.
- A backup starting as the previous one commits waits for that one's
  removal (which otherwise took its new snapshot), and waits for it
  without holding the device's write gate.

Against the session's real cluster.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.rbdsnaps import RbdSnapshots, Taking
from tests.cephcluster import CephCluster, RbdImage
from tests.test_rbd_backup_steps import PROMPT, HeldRemoval, after_a_full, in_call, wait_for, write
from tests.test_rbd_source import snapshots

MiB = 1024 * 1024


def _join_removals() -> None:
    for t in threading.enumerate():
        if t.name.startswith("backupfs-rbd-tidy"):
            t.join(PROMPT)


def _pending(tid: int, sig: int) -> bool:
    """Whether ``sig`` waits, sent but blocked, for thread ``tid`` (its SigPnd)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("SigPnd:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_stop_while_close_waits_for_the_snapshot_removal_does_not_cut_the_wait(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldRemoval(monkeypatch)
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, _full):
        try:
            write(ceph_cluster, image, 2 * MiB)
            held.hold()
            inc = repo.backup("vm", "incremental").record.id
            assert held.removing.wait(PROMPT)
            dev = repo.device("vm")
            main = threading.main_thread()
            assert main.ident == threading.get_ident() and main.native_id is not None

            def ctrl_c_then_release() -> None:
                wait_for(lambda: in_call(main, "settle"), "waiting for the removal in close")
                signal.pthread_kill(main.ident, signal.SIGINT)  # a Ctrl-C while close waits
                # Either the stop is held back (pending for the main thread) or it
                # ended the wait (the main thread left it): then let the removal end.
                wait_for(lambda: _pending(main.native_id, signal.SIGINT) or not in_call(main, "settle"),
                         "the Ctrl-C taken")
                held.release.set()

            helper = threading.Thread(target=ctrl_c_then_release)
            helper.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    dev.close()  # the CLI's exit closing the repository
            finally:
                held.release.set()
                helper.join(PROMPT)
            # The stop is raised once the removal is done, not in its middle.
            assert not [t for t in threading.enumerate() if t.name.startswith("backupfs-rbd-tidy")], \
                "close gave up waiting for the removal at the stop, which still runs on the image"
        finally:
            held.release.set()
            _join_removals()  # never close the cluster under it (librbd would crash the test)
    assert snapshots(ceph_cluster, image) == [f"backupfs-{inc}"]


def test_a_restore_counts_the_process_holding_the_image_as_one_client(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path) -> None:
    """After a backup the device holds its head and its reader (both watches
    of one connection): a restore over the image names one client, not two."""
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, full):
        repo.device("vm").settle()  # type: ignore[attr-defined]
        with pytest.raises(UsageError) as refused:
            repo.restore_rbd("vm", full, image.source, ceph_conf=str(ceph_cluster.conf))
        said = str(refused.value)
        assert "is in use: 1 client(s) have it open" in said, said
        assert "\n" not in said


def test_a_backup_started_as_the_previous_one_commits_keeps_its_snapshot(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two backups of one device in one process (the API from two threads):
    the second may start as soon as the first's commit lets the device go.
    The first's removal of older snapshots must be one the second waits for,
    or it removes the snapshot the second has just taken and reads."""
    from engine.rbddevice import RbdDevice

    at_after, second_took, removed = threading.Event(), threading.Event(), threading.Event()
    after_backup, wait, keep_only = RbdDevice.after_backup, Taking.wait, RbdSnapshots.keep_only
    second: list[threading.Thread] = []

    def slow_after_backup(self: RbdDevice, work: Callable[[], object]) -> None:
        if not at_after.is_set():
            at_after.set()
            # The second backup's snapshot first, if it can be taken now; if it
            # cannot, the second waits for the device (its write gate, held here).
            wait_for(lambda: second_took.is_set() or (bool(second) and in_call(second[0], "exclusive")),
                     "the second backup taking its snapshot or waiting for the device")
        after_backup(self, work)

    def noted_keep_only(self: RbdSnapshots, backup_id: str) -> bool:
        try:
            return keep_only(self, backup_id)
        finally:
            removed.set()

    def noted_wait(self: Taking) -> str:
        try:
            return wait(self)
        finally:
            if at_after.is_set():
                second_took.set()
                removed.wait(PROMPT)  # the first's removal done: what it left, the second reads

    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, image, _full):
        write(ceph_cluster, image, 2 * MiB)
        monkeypatch.setattr(RbdDevice, "after_backup", slow_after_backup)
        monkeypatch.setattr(RbdSnapshots, "keep_only", noted_keep_only)
        monkeypatch.setattr(Taking, "wait", noted_wait)
        results: dict[str, object] = {}

        def backup(key: str) -> None:
            try:
                results[key] = repo.backup("vm", "incremental").record.id
            except Exception as e:  # noqa: BLE001 - the test says what it was
                results[key] = e

        first = threading.Thread(target=backup, args=("first",))
        first.start()
        assert at_after.wait(PROMPT)
        second.append(threading.Thread(target=backup, args=("second",)))
        second[0].start()
        first.join(PROMPT)
        second[0].join(PROMPT)
        assert not first.is_alive() and not second[0].is_alive()
        assert isinstance(results["first"], str), results["first"]
        assert isinstance(results["second"], str), f"the second backup failed: {results['second']}"
        repo.device("vm").settle()  # type: ignore[attr-defined]
        assert snapshots(ceph_cluster, image) == [f"backupfs-{results['second']}"]


def test_writes_through_the_device_go_on_while_a_backup_waits_for_the_previous_removal(
        ceph_cluster: CephCluster, rbd_image: Callable[..., RbdImage], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup triggered while the previous one's removal still runs waits
    for it, but not holding the device's write gate: a VM writing through the
    mount's device file was stalled for the whole removal (a monitor's round
    each snapshot, tens of seconds on a cluster that times out)."""
    held = HeldRemoval(monkeypatch)
    with after_a_full(ceph_cluster, rbd_image, tmp_path) as (repo, _, _image, _full):
        dev = repo.device("vm")
        held.hold()
        try:
            dev.write(2 * MiB, b"a" * 4096)
            repo.backup("vm", "incremental")
            assert held.removing.wait(PROMPT)
            held.let_go()
            dev.write(3 * MiB, b"b" * 4096)
            results: list[object] = []
            nxt = threading.Thread(target=lambda: results.append(repo.backup("vm", "incremental")))
            nxt.start()
            # The next backup waits for the removal now (before the gate, or,
            # as it was, under it), not yet past it: the removal is held.
            wait_for(lambda: in_call(nxt, "settle"), "the next backup waiting for the removal")
            wrote = threading.Thread(target=dev.write, args=(4 * MiB, b"c" * 4096))
            wrote.start()
            wrote.join(PROMPT)
            stalled = wrote.is_alive()
        finally:
            held.release.set()
            nxt.join(PROMPT)
            wrote.join(PROMPT)
        assert not stalled, "a write through the device waited for the previous backup's removal"
        assert results and not isinstance(results[0], Exception)
