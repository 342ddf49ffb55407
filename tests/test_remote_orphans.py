"""What a killed push leaves on the remote, and who cleans it up.

A push killed with -9 leaves complete objects no catalog names. When the
backup they belong to is still here, the next push takes them as sent; when
it was pruned here meanwhile, the next push must delete them (else they stay
forever) -- and never anything of another form (a user's file in the bucket).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.remote.location import parse_s3_url
from engine.remote.store import RemoteStore
from tests.commands import cli, repo_with_a_full
from tests.s3remote import S3Remote, kill_push_when
from tests.test_remote_push import _listed, _restores_equal, _summary

MiB = 1 << 20
USERS = {"devices/notes.txt": b"mine", "other/x": b"mine too", "devices/b/readme.txt": b"also mine",
         "devices/b/20261206T000000Z-0001-full.qcow2.part": b"not our form either"}


def _ids(repo: Path, device: str) -> list[str]:
    return [b["id"] for b in json.loads(cli("list", repo, device, "--json").stdout)]


def _newest_catalog_keys(s3: S3Remote) -> set[str]:
    newest = max(k for k in s3.keys() if k.startswith("catalog/"))
    doc = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{newest}")["Body"].read())
    return {o["key"] for b in doc["backups"] for o in (b["image"], b["checksums"]) if o}


def test_a_killed_push_of_a_backup_pruned_since_leaves_nothing(tmp_path: Path, s3_remote: S3Remote) -> None:
    s3 = s3_remote
    disk_a, disk_b = tmp_path / "disk-a", tmp_path / "disk-b"
    disk_a.write_bytes(os.urandom(2 * MiB))
    disk_b.write_bytes(os.urandom(24 * MiB))
    repo = repo_with_a_full(tmp_path / "repo", "a", disk_a)
    cli("remote", "add", repo, "off", s3.url)
    s3.cli("push", repo, "off")
    cli("device", "add", repo, "b", disk_b)
    cli("backup", repo, "b", "full")
    with open(disk_b, "r+b") as f:
        f.seek(7 * MiB)
        f.write(os.urandom(MiB))
    cli("backup", repo, "b", "incremental")
    for key, body in USERS.items():
        s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{key}", Body=body)
    # An object of our form for a device this repository does not have (removed here).
    gone = "devices/zz/20261206T000000Z-0009-full.qcow2"
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{gone}", Body=b"x" * 100)

    kill_push_when(repo, s3,
                   lambda keys: any(k.startswith("devices/b/") and k.endswith("full.qcow2") for k in keys))
    full_id = _ids(repo, "b")[0]
    left = {k for k in s3.keys() if k.startswith("devices/b/") and k not in USERS}
    assert f"devices/b/{full_id}.qcow2" in left

    cli("prune", repo, "b", "--remove", full_id)  # the incremental is rewritten into a full
    counts = _summary(s3.cli("push", repo, "off").stdout)
    keys = s3.keys()
    named = _newest_catalog_keys(s3)
    orphans = (left | {gone}) - named
    assert f"devices/b/{full_id}.qcow2" in orphans
    assert not orphans & set(keys), orphans & set(keys)
    assert counts["deleted"] == len(orphans), (counts, orphans)
    assert {k for k in keys if k.startswith("devices/")} - set(USERS) == named
    for key, body in USERS.items():  # never anything of another form
        assert s3.client.get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{key}")["Body"].read() == body
    assert _listed(s3, s3.url) == _listed(s3, repo)
    assert s3.cli("verify", s3.url).returncode == 0
    assert _restores_equal(s3, repo, tmp_path, "b") == 1


def test_a_killed_push_of_a_device_left_out_is_kept_for_later(tmp_path: Path, s3_remote: S3Remote,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`push REPO NAME a` after a killed push of b: b's complete upload is still a
    backup here, so it stays, and the next push of b takes it as sent."""
    s3 = s3_remote
    disk_a, disk_b = tmp_path / "disk-a", tmp_path / "disk-b"
    disk_a.write_bytes(os.urandom(2 * MiB))
    disk_b.write_bytes(os.urandom(20 * MiB))
    repo = repo_with_a_full(tmp_path / "repo", "a", disk_a)
    cli("device", "add", repo, "b", disk_b)
    cli("backup", repo, "b", "full")
    cli("remote", "add", repo, "off", s3.url)
    (full_id,) = _ids(repo, "b")
    image = repo / "devices" / "b" / f"{full_id}.qcow2"
    # What a push killed after b's image went up leaves: the image, sent as a push sends
    # it, and no catalog naming it.
    for k, v in s3.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    fd = os.open(image, os.O_RDONLY)
    try:
        RemoteStore("remote t", parse_s3_url(s3.url)).upload_fd(f"devices/b/{full_id}.qcow2", fd,
                                                                image.stat().st_size)
    finally:
        os.close(fd)
    counts = _summary(s3.cli("push", repo, "off", "a").stdout)
    assert counts["deleted"] == 0
    assert f"devices/b/{full_id}.qcow2" in s3.keys()
    counts = _summary(s3.cli("push", repo, "off").stdout)
    assert (counts["resumed"], counts["uploaded"], counts["deleted"]) == (1, 1, 0), counts
