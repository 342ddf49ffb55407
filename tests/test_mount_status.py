"""The job status as data: the ``user.backupfs.status`` xattr of a snapshot file.

The CLI learns how a job through the mount went from this JSON, not from
the text people read (backupfs/mountstatus.py). Checked on the tree model
(no mount) for every state, against the JobStatus it comes from; its
reader refuses a value that is not a status; and through a real mount,
the CLI's backup, verify and prune say what the xattr says.
"""

from __future__ import annotations

import errno
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.mountstatus import (
    STATUS_XATTR, XATTR_SIZE_MAX, decode_status, encode_status, failure_message, progress_text, read_status,
)
from backupfs.status import JobStatus
from backupfs.tree import SNAPSHOT, Tree
from engine.errors import BackupfsError
from engine.job import Progress
from engine.repo import Repository
from tests.jobstatuses import Statuses
from tests.commands import cli
from tests.mounts import Mounted

KiB, MiB = 1024, 1024 * 1024



@pytest.fixture
def model(repo: Repository, tmp_path: Path) -> tuple[Repository, Tree, Statuses]:
    src = tmp_path / "vm1.img"
    src.write_bytes(random.Random(3).randbytes(MiB))
    repo.add_device("vm1", str(src), 64 * KiB)
    statuses = Statuses()
    return repo, Tree(repo, statuses, 1_234_567_890), statuses


def _xattr(tree: Tree, device: str = "vm1") -> dict:
    values = tree.xattrs(tree.inodes.get(SNAPSHOT, device))
    assert list(values) == [STATUS_XATTR.encode()]
    raw = json.loads(values[STATUS_XATTR.encode()])  # plain JSON, whatever reads it
    assert decode_status(values[STATUS_XATTR.encode()]) == raw
    return raw


def test_idle_and_running(model: tuple[Repository, Tree, Statuses]) -> None:
    _, tree, statuses = model
    idle = _xattr(tree)
    assert idle["state"] == "idle" and idle["progress"] is None and idle["result"] is None
    assert idle["started"] is None and idle["lines"] == [] and idle["lines_left_out"] == 0
    assert progress_text(decode_status(encode_status(statuses("vm1").fields())), "idle here") == "idle here"

    status = statuses("vm1")
    status.begin("full", requester="pid 42 (hook)")
    assert _xattr(tree)["progress"] is None  # not under way yet
    assert progress_text(_xattr(tree), "-") == "starting"  # as the text says it
    status.progress = Progress(total=4 * MiB, done=MiB, phase="copying")
    running = _xattr(tree)
    assert (running["state"], running["command"], running["requester"]) == ("running", "full", "pid 42 (hook)")
    p = running["progress"]
    assert (p["phase"], p["done"], p["total"]) == ("copying", MiB, 4 * MiB)
    assert p["text"].startswith("copying 1") and "(25%)" in p["text"]
    # The words people read (the rate part moves with the clock between two looks).
    assert f"progress: {p['text'].split(', ')[0]}, " in status.render()


def test_a_backup_that_succeeded(model: tuple[Repository, Tree, Statuses]) -> None:
    repo, tree, statuses = model
    result = repo.backup("vm1", "full", label="nightly")
    status = statuses("vm1")
    status.begin("full")
    status.succeed(result)
    done = _xattr(tree)
    assert done["state"] == "succeeded" and done["error"] is None and done["errno"] is None
    r = done["result"]
    assert (r["backup"], r["kind"], r["parent"]) == (result.record.id, "full", None)
    assert (r["bytes_examined"], r["bytes_stored"]) == (result.bytes_total, result.bytes_written)
    assert r["seconds"] == result.seconds and r["scanned"] is result.scanned
    assert done["finished"] >= done["started"]


def test_failures_keep_their_raw_words(model: tuple[Repository, Tree, Statuses]) -> None:
    _, tree, statuses = model
    status = statuses("vm1")
    status.begin("full")
    status.fail("source vm1\nstate: succeeded \x1b[31m", errno.EINVAL, bitmap_kept=False)
    failed = _xattr(tree)
    # Unescaped in the JSON (whoever prints it escapes it); the text has it on one line.
    assert (failed["state"], failed["errno"], failed["bitmap_kept"]) == ("failed", "EINVAL", False)
    assert failed["error"] == "source vm1\nstate: succeeded \x1b[31m"
    assert "\nstate: succeeded" not in status.render()

    status.begin("verify")
    status.cancel("pid 7 (sh) received SIGTERM")
    cancelled = _xattr(tree)
    assert (cancelled["state"], cancelled["error"]) == ("cancelled", "pid 7 (sh) received SIGTERM")
    assert failure_message(failed) == failed["error"] and failure_message(cancelled) is None


def test_lines_too_long_for_an_xattr_are_left_out_and_counted(model: tuple[Repository, Tree, Statuses]) -> None:
    _, tree, statuses = model
    status = statuses("vm1")
    status.begin("verify")
    status.succeed(lines=["report: ok  a"])
    assert _xattr(tree)["lines"] == ["report: ok  a"]
    many = [f"report: ok  {i:040d}" for i in range(3000)]
    status.succeed(lines=many)
    value = tree.xattrs(tree.inodes.get(SNAPSHOT, "vm1"))[STATUS_XATTR.encode()]
    assert len(value) <= XATTR_SIZE_MAX  # a longer one could not be read at all
    fields = decode_status(value)
    assert (fields["lines"], fields["lines_left_out"], fields["state"]) == ([], 3000, "succeeded")


@pytest.mark.parametrize("value", [b"", b"state: idle\n", b"[]", b'{"state": "idle"}',
                                   encode_status(JobStatus().fields())[:-1]])
def test_a_value_that_is_not_a_status_is_refused(value: bytes) -> None:
    with pytest.raises(BackupfsError, match="the mount's job status (is not JSON|lacks fields)"):
        decode_status(value)


def test_a_file_without_the_status_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "snapshot"
    plain.write_text("state: succeeded\n")  # the text alone is not a status to the CLI
    with pytest.raises(BackupfsError, match="gives no job status"):
        read_status(str(plain))


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounted]:
    src = tmp_path / "vm1.img"
    src.write_bytes(random.Random(9).randbytes(4 * MiB))
    cli("init", tmp_path / "repo")
    cli("device", "add", tmp_path / "repo", "vm1", src)
    (tmp_path / "mnt").mkdir()
    m = Mounted(tmp_path / "repo", tmp_path / "mnt")
    m.start()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.mark.mount
def test_the_cli_reports_what_the_xattr_says(mounted: Mounted) -> None:
    m = mounted
    snapshot = m.path("vm1", "snapshot")
    assert json.loads(os.getxattr(snapshot, STATUS_XATTR))["state"] == "idle"
    assert STATUS_XATTR in os.listxattr(snapshot)

    out = cli("backup", m.repo, "vm1", "full", "--label", "first").stdout.decode()
    fields = json.loads(os.getxattr(snapshot, STATUS_XATTR))
    r = fields["result"]
    assert fields["state"] == "succeeded" and fields["command"].startswith("full")
    assert out == (f"{r['backup']}: full, {r['bytes_stored']} bytes stored of {r['bytes_examined']} examined "
                   f"in {r['seconds']:.2f} s (through the mount at {m.mnt})\n")
    assert os.readlink(m.path("vm1", "backups", "latest")) == r["backup"]

    out = cli("verify", m.repo, "vm1").stdout.decode()
    fields = json.loads(os.getxattr(snapshot, STATUS_XATTR))
    assert fields["command"] == "verify" and fields["state"] == "succeeded"
    assert out.splitlines() == [line.removeprefix("report: ") for line in fields["lines"]]
    assert out.splitlines()[0] == f"ok  {r['backup']}"

    out = cli("prune", m.repo, "vm1", "--keep-last", "1", "--dry-run").stdout.decode()
    assert json.loads(os.getxattr(snapshot, STATUS_XATTR))["lines"] == out.splitlines() == [
        f"keep: {r['backup']} (newest, keep-last 1)", "would free: nothing (no backup would be removed)"]

    bad = cli("verify", m.repo, "vm1", "--backup", "no-such-backup", check=False)
    fields = json.loads(os.getxattr(snapshot, STATUS_XATTR))
    assert fields["state"] == "failed" and fields["error"] and fields["errno"]
    assert bad.returncode == 1 and bad.stderr.decode() == f"backupfs: error: {fields['error']}\n"
