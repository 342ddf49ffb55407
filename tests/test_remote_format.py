"""What a remote holds is checked when it is read (engine/remote/layout.py), and
remotes are recorded in the catalog: quick tests, no S3 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.errors import UsageError
from engine.remote.layout import RemoteFormatError, decode_snapshot, object_keys, revision_of
from engine.remote.location import make_spec, parse_s3_url
from tests.commands import cli

SHA = "ab" * 32
KEY = "devices/vm1/20261206T000000Z-0001-full.qcow2"


def _snapshot(**change: Any) -> dict[str, Any]:
    backup = {"id": "20261206T000000Z-0001-full", "device": "vm1", "seq": 1, "kind": "full", "parent": None,
              "created_ns": 1, "size": 1 << 20, "cluster_size": 65536, "granularity": 65536, "stored_bytes": 10,
              "label": None, "scanned": False,
              "image": {"key": "devices/vm1/20261206T000000Z-0001-full.qcow2", "size": 5, "sha256": SHA},
              "checksums": None}
    backup.update(change.pop("backup", {}))
    doc = {"format": 1, "number": 3, "written_ns": 0, "complete": True,
           "devices": [{"name": "vm1", "size": 1 << 20, "granularity": 65536, "compress": "none", "created_ns": 0}],
           "backups": [backup]}
    doc.update(change)
    return doc


def test_a_snapshot_round_trips() -> None:
    snap = decode_snapshot(json.dumps(_snapshot()).encode(), "t")
    assert decode_snapshot(snap.encode(), "t").content() == snap.content()
    assert snap.keys() == {"devices/vm1/20261206T000000Z-0001-full.qcow2"}


@pytest.mark.parametrize("change, words", [
    ({"backup": {"image": {"key": "devices/vm1/../../../etc/passwd.qcow2", "size": 5, "sha256": SHA}}},
     "is not one of backup"),
    ({"backup": {"image": {"key": "devices/vm2/20261206T000000Z-0001-full.qcow2", "size": 5, "sha256": SHA}}},
     "is not one of backup"),
    ({"backup": {"id": "../x"}}, "not a backup id"),
    ({"backup": {"device": "../x"}}, "is not one of the snapshot's devices"),
    ({"devices": [{"name": "a/b", "size": 1, "granularity": 512}]}, "device-name rule"),
    ({"backup": {"parent": "20261205T000000Z-0000-full"}}, "not a backup listed before it"),
    ({"backup": {"kind": "weird"}}, "kind"),
    ({"backup": {"size": -1}}, "size"),
    ({"backup": {"image": {"key": "devices/vm1/20261206T000000Z-0001-full.qcow2", "size": 5, "sha256": "x"}}},
     "is not an S3 ETag"),
    ({"backup": {"image": {"key": KEY, "size": 5, "etag": "ab" * 16 + "-2", "part_size": 8 << 20}}},
     "counts 2 parts"),
    ({"backup": {"image": {"key": KEY, "size": 5, "etag": "ab" * 16, "part_size": 8 << 20}}},
     "single upload"),
    ({"backup": {"image": {"key": KEY, "size": 20 << 20, "etag": "ab" * 16 + "-20", "part_size": 1}}},
     "part_size 1 is not"),
    ({"backup": {"image": {"key": KEY, "size": 5, "etag": "AB" * 16, "part_size": 0}}}, "is not an S3 ETag"),
    ({"backup": {"image": {"key": KEY, "size": 5, "etag": "ab" * 16, "part_size": True}}}, "not a number"),
    ({"format": 2}, "upgrade backupfs"),
    ({"complete": False}, "not a complete catalog snapshot"),
])
def test_a_hostile_snapshot_is_refused(change: dict[str, Any], words: str) -> None:
    with pytest.raises(RemoteFormatError, match=words):
        decode_snapshot(json.dumps(_snapshot(**change)).encode(), "remote t")


@pytest.mark.parametrize("size", [0, 1, 16 << 20, (16 << 20) + 1, 24 << 20])
def test_the_recorded_checksum_is_the_etag_of_our_upload(tmp_path: Path, size: int) -> None:
    """What a push records is the ETag S3 computes: MD5 of one PUT's body, or the MD5
    of the parts' MD5s and -N for a multipart upload; read back in any pieces, it matches,
    and one flipped byte does not."""
    import hashlib
    import os

    from engine.remote.store import MULTIPART_THRESHOLD, PART_SIZE, local_checksum

    data = os.urandom(size)
    path = tmp_path / "obj"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        checksum = local_checksum(fd, size)
    finally:
        os.close(fd)
    if size <= MULTIPART_THRESHOLD:
        assert (checksum.etag, checksum.part_size) == (hashlib.md5(data).hexdigest(), 0)
    else:
        parts = [hashlib.md5(data[o:o + PART_SIZE]).digest() for o in range(0, size, PART_SIZE)]
        assert checksum.etag == hashlib.md5(b"".join(parts)).hexdigest() + f"-{len(parts)}"
        assert checksum.part_size == PART_SIZE
    for piece in (1 << 20, 3 << 20, 7777777):
        digest = checksum.digest()
        for o in range(0, size, piece):
            digest.update(data[o:o + piece])
        assert checksum.matches(digest)
    if size:
        digest = checksum.digest()
        digest.update(data[:-1] + bytes([data[-1] ^ 1]))
        assert not checksum.matches(digest)
    doc = {"key": KEY, "size": size, **checksum.fields()}
    snap = decode_snapshot(json.dumps(_snapshot(backup={"image": doc})).encode(), "t")
    assert snap.backups[0].image.checksum == checksum


def test_an_older_snapshots_sha256_still_checks() -> None:
    import hashlib

    data = b"hello"
    snap = decode_snapshot(json.dumps(_snapshot(backup={"image": {
        "key": KEY, "size": 5, "sha256": hashlib.sha256(data).hexdigest()}})).encode(), "t")
    checksum = snap.backups[0].image.checksum
    digest = checksum.digest()
    digest.update(data)
    assert checksum.matches(digest) and checksum.fields() == {"sha256": hashlib.sha256(data).hexdigest()}


def test_keys_and_revisions() -> None:
    assert object_keys("vm1", "X-0001-full", 0) == ("devices/vm1/X-0001-full.qcow2", "devices/vm1/X-0001-full.sums")
    assert object_keys("vm1", "X-0001-full", 2)[0] == "devices/vm1/X-0001-full.r2.qcow2"
    assert revision_of("vm1", "X-0001-full", "devices/vm1/X-0001-full.r2.sums") == 2
    assert revision_of("vm1", "X-0001", "devices/vm1/X-0001-full.qcow2") is None
    assert revision_of("vm1", "X", "devices/vm1/X.r0.qcow2") is None


@pytest.mark.parametrize("url", ["s3://", "s3://A/x", "s3://b/x", "http://bucket/x", "s3://bucket/../x",
                                 "s3://bucket/a//b/./c", "s3://bucket/a\nb"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(UsageError):
        parse_s3_url(url)


def test_spec_checks() -> None:
    assert parse_s3_url("s3://my-bucket/a/b/").prefix == "a/b"
    with pytest.raises(UsageError, match="endpoint"):
        make_spec("off", "s3://my-bucket/p", "http://user:pw@host")
    with pytest.raises(UsageError, match="remote name"):
        make_spec("../off", "s3://my-bucket/p")


def test_remote_add_list_remove(tmp_path: Path) -> None:
    from engine.repo import Repository

    repo = tmp_path / "repo"
    Repository.init(str(repo))
    cli("remote", "add", repo, "off", "s3://my-bucket/site", "--endpoint", "http://127.0.0.1:9", "--region", "eu-1")
    again = cli("remote", "add", repo, "off", "s3://my-bucket/other", check=False)
    assert again.returncode == 1 and "exists already" in again.stderr.decode()
    assert json.loads(cli("remote", "list", repo, "--json").stdout) == [
        {"name": "off", "url": "s3://my-bucket/site", "endpoint": "http://127.0.0.1:9", "region": "eu-1"}]
    cli("remote", "remove", repo, "off")
    gone = cli("push", repo, "off", check=False)
    assert gone.returncode == 1 and "no remote named 'off'" in gone.stderr.decode()


def test_a_copied_remote_with_a_hostile_catalog_is_one_line(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    (copy / "catalog").mkdir(parents=True)
    (copy / "backupfs-remote.json").write_text('{"format": 1}')
    (copy / "catalog" / "0000000003.json").write_text(json.dumps(_snapshot(backup={"id": "../../x"})))
    proc = cli("list", copy, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and len(err.splitlines()) == 1
    assert "no catalog snapshot can be read" in err and "not a backup id" in err
    # A newer snapshot that is whole wins over the broken one.
    (copy / "catalog" / "0000000004.json").write_text(json.dumps(_snapshot(number=4)))
    assert cli("list", copy).stdout.decode().splitlines()[1].startswith("20261206T000000Z-0001-full\tvm1\tfull")


def test_remotes_through_the_facade_survive_reopening(tmp_path: Path) -> None:
    from engine.repo import Repository, remote_named

    Repository.init(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo")) as repo:
        repo.add_remote(make_spec("b", "s3://my-bucket/b"))
        repo.add_remote(make_spec("a", "s3://my-bucket/a", region="eu-west-1"))
        origin = repo.catalog.origin()
    with Repository.open(str(tmp_path / "repo")) as repo:
        assert [r.name for r in repo.remotes()] == ["a", "b"]
        assert remote_named(repo.catalog, "a").region == "eu-west-1"
        assert repo.catalog.origin() == origin and origin is not None and len(origin) == 32
        assert repo.remove_remote("a") and not repo.remove_remote("a")
        with pytest.raises(UsageError, match="no remote named 'a' \\(remotes: b\\)"):
            remote_named(repo.catalog, "a")
