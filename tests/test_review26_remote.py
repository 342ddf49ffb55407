"""A hostile review of the S3 remote (engine/remote/, backupfs/cli_remote.py):
a remote someone else can write to, a careless admin, a crash.

Each test is a finding: it failed before the fix beside it (or is an
xfail(strict=True) naming what is left). What held is in the report, not
here. Tests that need radosgw take the ``s3_remote`` fixture (marked ceph and
long at collection); the rest are quick and need no server.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from engine.remote.layout import RemoteFormatError, decode_snapshot
from tests.commands import cli, repo_with_a_full
from tests.s3remote import S3Remote

MiB = 1 << 20
SHA = "ab" * 32


def _snapshot_doc() -> dict[str, object]:
    backup = {"id": "20261206T000000Z-0001-full", "device": "vm1", "seq": 1, "kind": "full", "parent": None,
              "created_ns": 1, "size": MiB, "cluster_size": 65536, "granularity": 65536, "stored_bytes": 10,
              "label": None, "scanned": False,
              "image": {"key": "devices/vm1/20261206T000000Z-0001-full.qcow2", "size": 5, "sha256": SHA},
              "checksums": None}
    device = {"name": "vm1", "size": MiB, "granularity": 65536, "compress": "none", "created_ns": 0}
    return {"format": 1, "number": 3, "written_ns": 0, "complete": True, "devices": [device],
            "backups": [backup]}


def test_a_snapshot_listing_a_device_twice_is_refused() -> None:
    """A hostile snapshot naming one device twice with different sizes: which one a
    reader took was the dict's last word, silently (the mount's device size, the
    restore's target check). A snapshot a push writes never does it: refuse it."""
    doc = _snapshot_doc()
    devices = doc["devices"]
    assert isinstance(devices, list)
    devices.append(dict(devices[0], size=1 << 40))
    with pytest.raises(RemoteFormatError, match="vm1.*twice"):
        decode_snapshot(json.dumps(doc).encode(), "t")


@pytest.fixture
def small_repo(tmp_path: Path, s3_remote: S3Remote) -> Path:
    """A repository with one 1 MiB device and its full, the remote recorded as `off`."""
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(MiB))
    repo = repo_with_a_full(tmp_path / "repo", "vm1", disk)
    cli("remote", "add", repo, "off", s3_remote.url)
    return repo


@pytest.mark.parametrize("renewed", [1e20, "NaN"])
@pytest.mark.parametrize("key", ["lock/0000000003.json", "lock.json"])  # lock.json: older backupfs
def test_a_lock_with_an_absurd_time_is_one_clear_line(small_repo: Path, s3_remote: S3Remote,
                                                       renewed: float | str, key: str) -> None:
    """A lock object someone else wrote, renewed in the year 3e12 (or NaN): the push said
    'internal error: OverflowError: timestamp out of range' (exit 70) while formatting
    the owner's time. It must be the ordinary refusal, naming the lock."""
    body = '{"host": "elsewhere.example", "pid": 4242, "token": "x", "renewed": %s, "lease_seconds": 300}' % (
        renewed,)
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{key}", Body=body.encode())
    proc = s3_remote.cli("push", small_repo, "off", check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 1, err
    assert len(err.splitlines()) == 1 and "internal error" not in err, err
    assert "another push holds the remote's lock (elsewhere.example pid 4242" in err, err
    assert f"delete {key} from the remote by hand" in err, err  # it would never run out by itself
    assert not any(k.startswith("catalog/") for k in s3_remote.keys())


def test_a_crash_after_an_eviction_never_serves_the_punched_block(tmp_path: Path, s3_remote: S3Remote,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's record of present blocks is saved at close and every 30 s; an
    eviction clears the bit in memory and punches the hole at once. A kill -9 of the
    mount's daemon between the two left a record saying 'present' over a hole, and
    the next mount served zeros for that block (the qcow2 header or a table read as
    zeros: a broken chain; data: EIO at best). Driven in this process through the
    real cache and radosgw: the 'crash' is closing the cache's files without save."""
    from engine.remote.digest import Checksum
    from engine.remote.layout import RemoteObject
    from engine.remote.location import parse_s3_url
    from engine.remote.objcache import ObjectCache
    from engine.remote.store import RemoteStore

    for k, v in s3_remote.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    data = os.urandom(20 * MiB)
    key = "devices/vm1/20261206T000000Z-0001-full.qcow2"
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{key}", Body=data)
    obj = RemoteObject(key, len(data), Checksum(sha256=hashlib.sha256(data).hexdigest()))
    store = RemoteStore("remote t", parse_s3_url(s3_remote.url))
    etag = store.listing()[key].etag
    cache_dir = tmp_path / "cache"

    first = ObjectCache(store, str(cache_dir), 16 * MiB)
    crashed = False
    try:
        cached = first.open(obj, etag)
        cached.ensure(0, 4 * MiB, ahead=False)()
        cached.save()  # blocks 0-3 recorded present (the 30 s save, or an earlier close)
        cached.ensure(4 * MiB, 14 * MiB, ahead=False)()  # 18 MiB > 16: blocks 0 and 1 evicted
        assert not cached.present[0]
        # kill -9: nothing saved, the files simply closed.
        first._pool.shutdown(wait=True)
        cached.drop_handle()
        os.close(first._lock_fd)
        crashed = True
    finally:
        if not crashed:
            first.close()

    second = ObjectCache(store, str(cache_dir), 64 * MiB)
    try:
        again = second.open(obj, etag)
        again.ensure(0, 2 * MiB, ahead=False)()
        with open(again.path, "rb") as f:
            assert f.read(2 * MiB) == data[:2 * MiB]
    finally:
        second.close()


def test_an_endpoint_from_the_environment_never_shows_its_password(tmp_path: Path) -> None:
    """`--endpoint` refuses user:password@, but $AWS_ENDPOINT_URL (what boto3 reads when
    no --endpoint is given) was taken as it was and printed whole in 'cannot reach the
    endpoint http://user:hunter2@...'. Quick: port 9 of loopback refuses at once."""
    from tests.commands import backupfs_cmd
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIAREVIEW", AWS_SECRET_ACCESS_KEY="not-a-secret-either",
               AWS_ENDPOINT_URL="http://user:hunter2@127.0.0.1:9", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run(backupfs_cmd() + ["list", "s3://review-bucket/p"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 1 and "cannot reach the endpoint" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout and "not-a-secret" not in proc.stderr, proc.stderr
    assert "127.0.0.1:9" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _env_into(monkeypatch: pytest.MonkeyPatch, s3: S3Remote) -> None:
    for k, v in s3.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)


def test_a_grown_object_is_refused_before_it_fills_the_disk(small_repo: Path, s3_remote: S3Remote,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone with write access replaces a pushed image with a far larger object: a
    remote restore/ls/dump downloaded ALL of it into the temporary directory before
    comparing its size with the catalog's (a 5 TB object fills /tmp first). What
    lands on disk must stop at the catalog's size."""
    from engine.remote.fetch import DamagedObject, fetch_chain
    from engine.remote.location import parse_s3_url
    from engine.remote.remotecatalog import read_store_catalog
    from engine.remote.store import RemoteStore

    s3_remote.cli("push", small_repo, "off")
    image = next(k for k in s3_remote.keys() if k.endswith(".qcow2"))
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{image}",
                                Body=os.urandom(24 * MiB))
    _env_into(monkeypatch, s3_remote)
    store = RemoteStore("remote t", parse_s3_url(s3_remote.url))
    catalog = read_store_catalog(store)[0]
    (ident,) = [b.id for b in catalog.backups()]
    size = catalog.entry(ident).image.size  # type: ignore[union-attr]
    work = tmp_path / "work"
    work.mkdir()
    received = 0

    def counted(n: int) -> None:
        nonlocal received
        received += n

    with pytest.raises(DamagedObject, match="damaged"):
        fetch_chain(store, catalog, ident, str(work), counted)
    assert max(p.stat().st_size for p in work.iterdir()) <= size
    assert received <= size


def test_a_cache_dir_given_by_hand_loses_no_file_of_its_own(tmp_path: Path) -> None:
    """A careless admin mounts with `-o cache=~/work` (a directory holding other files):
    every `*.data` there was taken as an earlier mount's object, counted against
    cache_size and, the cache being over its limit, unlinked. Only the cache's own
    files (40 hex digits .data/.blocks) may ever be evicted. Quick: no GET is made."""
    from engine.remote.digest import Checksum
    from engine.remote.layout import RemoteObject
    from engine.remote.location import parse_s3_url
    from engine.remote.objcache import ObjectCache
    from engine.remote.store import RemoteStore

    work = tmp_path / "work"
    work.mkdir()
    precious = work / "results.data"
    precious.write_bytes(os.urandom(20 * MiB))  # more than the cache's 16 MiB, really on disk
    store = RemoteStore("remote t", parse_s3_url("s3://review-bucket/p"), "http://127.0.0.1:9")
    cache = ObjectCache(store, str(work), 16 * MiB)
    try:
        cache.open(RemoteObject("devices/vm1/20261206T000000Z-0001-full.qcow2", MiB, Checksum(sha256=SHA)), "etag")
    finally:
        cache.close()
    assert precious.exists() and precious.stat().st_size == 20 * MiB


@pytest.mark.mount  # runs `backupfs mount` (refused before FUSE is touched)
def test_a_cache_dir_of_another_user_gets_no_file_of_ours(tmp_path: Path) -> None:
    """`-o cache=/tmp/x` where /tmp/x is another (hostile) local user's, world-writable:
    the cache refuses it (`belongs to uid`), but the daemon's log was opened there first,
    so our log lines went into whatever file that user planted as backupfs.log (a file
    of theirs, readable by them). The directory must be refused before anything of
    ours is written into it. Quick: refused before the endpoint is reached."""
    import subprocess

    from tests.commands import backupfs_cmd

    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of another uid")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    planted = theirs / "backupfs.log"
    planted.write_text("")
    for p in (theirs, planted):
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o777 if p == theirs else 0o666)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIAREVIEW", AWS_SECRET_ACCESS_KEY="x", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run(backupfs_cmd() + ["mount", "s3://review-bucket/p", str(mnt), "--endpoint",
                                            "http://127.0.0.1:9", "-o", f"cache={theirs}"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "belongs to uid 65534" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert planted.read_text() == "" and sorted(os.listdir(theirs)) == ["backupfs.log"]
