"""Review of the remote's newest changes: each test here failed before its fix.

Against the real radosgw (the ``s3_remote`` fixture), driven through the
command line as a user would, or in this process through the real object
cache where what is measured is the cache's own GET count.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.commands import cli
from tests.s3remote import S3Remote, pushed_full
from tests.test_remote_push import _listed, _summary

MiB = 1 << 20


def test_a_push_with_nothing_new_keeps_the_only_snapshot_that_reads(tmp_path: Path, s3_remote: S3Remote) -> None:
    """Snapshots that do not parse (damaged, or written by hand) above the one that
    does: a push with nothing new writes no snapshot, and its pruning of old
    snapshots must not delete the one the catalog is read from."""
    s3 = s3_remote
    disk, repo = pushed_full(tmp_path, s3, "a", 2 * MiB)
    before = _listed(s3, s3.url)
    assert "catalog/0000000001.json" in s3.keys()
    for n in (2, 3, 4):
        s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/catalog/{n:010d}.json", Body=b"{not json")
    assert _listed(s3, s3.url) == before  # the unreadable ones are passed over

    counts = _summary(s3.cli("push", repo, "off").stdout)
    assert counts["uploaded"] == 0 and counts["current"] == 1, counts
    assert "catalog/0000000001.json" in s3.keys()
    assert _listed(s3, s3.url) == before
    assert s3.cli("verify", s3.url).returncode == 0


def test_a_second_sequential_pass_over_an_evicted_object_is_read_ahead(tmp_path: Path, s3_remote: S3Remote,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that reads an object larger than the cache to its end, then again from
    the start (cmp, then sha256sum): the second pass is read ahead in large GETs as the
    first was, not fetched a block a GET (the read-ahead's mark stayed at the end)."""
    from engine.remote.objcache import ObjectCache
    from tests.test_remote_readahead import _cache

    size = 64 * MiB
    data = os.urandom(size)
    cache, cached = _cache(tmp_path, s3_remote, monkeypatch, data)
    try:
        small = ObjectCache(cache.store, str(tmp_path / "small"), 16 * MiB)
    finally:
        cache.close()
    try:
        cached = small.open(cached.obj, cached.etag)
        gets = []
        for _ in range(2):
            before = small.stats["gets"]
            for block in range(size // MiB):
                cached.ensure(block * MiB, MiB)()
            gets.append(small.stats["gets"] - before)
        # The cache keeps a quarter of the object: the second pass fetches it all again.
        assert gets[0] <= size // MiB // 2, gets
        assert gets[1] <= size // MiB // 2, gets
    finally:
        small.close()


# A push's multipart upload in its own process, holding the lock with a short lease:
# once every part is sent it stops itself (SIGSTOP: a process stopped or starved
# between its last part and the upload's completion), then tells what it did.
UPLOADER = """
import os, signal, sys
from engine.remote.location import parse_s3_url
from engine.remote.lock import RemoteLock
from engine.remote.store import RemoteError, RemoteStore
store = RemoteStore("remote t", parse_s3_url(sys.argv[1]))
lock = RemoteLock(store, lease=float(sys.argv[2]))
lock.acquire()
size = os.path.getsize(sys.argv[4])
sent = 0
def on_bytes(n):
    global sent
    sent += n
    if sent == size:
        print("sent", lock.number, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
fd = os.open(sys.argv[4], os.O_RDONLY)
try:
    store.upload_fd(sys.argv[3], fd, size, on_bytes, lock.check)
    print("written", flush=True)
except RemoteError as e:
    print("lost", e, flush=True)
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "T"


def test_a_holder_stopped_before_completing_a_multipart_upload_never_completes_it(
        tmp_path: Path, s3_remote: S3Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part sent, then the holder is stopped past its lease and another push takes
    the lock over: woken, it must not complete the upload (radosgw ignores
    If-None-Match on the completion, so it would replace what the new holder wrote)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from engine.remote.lock import RemoteLock
    from tests.test_remote_lock import REPO_ROOT, _store

    store = _store(s3_remote, monkeypatch)
    image = tmp_path / "image"
    image.write_bytes(os.urandom(17 * MiB))  # above the single-PUT threshold: three parts
    key = "devices/vm1/20261206T000000Z-0001-full.qcow2"
    a = subprocess.Popen([sys.executable, "-c", UPLOADER, s3_remote.url, "1.5", key, str(image)],
                         env=s3_remote.env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    b = RemoteLock(store)
    try:
        assert a.stdout is not None
        line = a.stdout.readline()
        assert line.startswith("sent "), line + (a.stderr.read() if a.stderr else "")
        deadline = time.monotonic() + 30
        while not _stopped(a.pid):
            assert time.monotonic() < deadline
        (held,) = sorted(k for k in s3_remote.keys() if k.startswith("lock/"))
        renewed = json.loads(s3_remote.client.get_object(Bucket=s3_remote.bucket,
                                                         Key=f"{s3_remote.prefix}/{held}")["Body"].read())["renewed"]
        while time.time() <= renewed + 1.5:  # the lease itself is what is waited for
            assert time.monotonic() < deadline
        b.acquire()
        os.kill(a.pid, signal.SIGCONT)
        answer = a.stdout.readline()
        assert answer.startswith("lost "), answer
        assert key not in s3_remote.keys()
        b.check()
    finally:
        a.kill()
        a.wait()
        b.release()
    assert "Traceback" not in (a.stderr.read() if a.stderr else "")


def test_four_sequential_readers_of_the_smallest_cache_all_read(tmp_path: Path, s3_remote: S3Remote,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Four readers (the relay's threads), each sequential in its own object, through a
    cache of the smallest size: each reads ahead up to a quarter of it, and their GETs'
    reservations together must make a read wait, never fail it with ENOSPC."""
    import threading

    from engine.remote.digest import Checksum
    from engine.remote.layout import RemoteObject
    from engine.remote.objcache import MIN_CACHE, ObjectCache
    from tests.test_remote_readahead import _cache

    size = 32 * MiB
    objects = {f"devices/vm1/20261206T000000Z-000{i}-full.qcow2": os.urandom(size) for i in range(2, 6)}
    for key, data in objects.items():
        s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{key}", Body=data)
    first, _ = _cache(tmp_path, s3_remote, monkeypatch, b"x")  # (the store, with the bucket's credentials)
    store = first.store
    first.close()
    listing = store.listing()
    cache = ObjectCache(store, str(tmp_path / "small"), MIN_CACHE)
    problems: list[str] = []

    def read(key: str, data: bytes) -> None:
        etag = listing[key].etag
        cached = cache.open(RemoteObject(key, size, Checksum(etag=etag)), etag)
        try:
            for block in range(size // MiB):
                release = cached.ensure(block * MiB, MiB)
                try:
                    if os.pread(cached.fd, MiB, block * MiB) != data[block * MiB:(block + 1) * MiB]:
                        problems.append(f"{key} block {block}: other bytes")
                finally:
                    release()
        except Exception as e:  # the thread's failure is the test's
            problems.append(f"{key}: {e}")

    threads = [threading.Thread(target=read, args=item) for item in objects.items()]
    try:
        for t in threads:
            t.start()
    finally:
        for t in threads:
            t.join()
        cache.close()
    assert not problems, problems
    assert cache.stats["bytes"] >= len(objects) * size


def test_a_catalog_number_at_the_last_ten_digit_one_is_refused_not_written_unseen(
        tmp_path: Path, s3_remote: S3Remote) -> None:
    """An object at the last snapshot number (put by hand, or by a hostile writer): the
    next number has eleven digits, a key no reader lists. The push must refuse in one
    line before it uploads or deletes anything, never write a snapshot nobody reads
    (and then delete what the catalog readers do see still names)."""
    s3 = s3_remote
    disk, repo = pushed_full(tmp_path, s3, "a", 2 * MiB)
    before = _listed(s3, s3.url)
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/catalog/9999999999.json", Body=b"{not json")
    with open(disk, "r+b") as f:
        f.write(os.urandom(MiB))
    cli("backup", repo, "a", "incremental")
    keys = set(s3.keys())

    proc = s3.cli("push", repo, "off", check=False)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert "catalog/9999999999.json" in line, line
    assert not any(len(k) > len("catalog/0000000000.json") and k.startswith("catalog/") for k in s3.keys())
    assert {k for k in s3.keys() if not k.startswith("lock/")} == {k for k in keys if not k.startswith("lock/")}
    assert _listed(s3, s3.url) == before


@pytest.mark.mount
@pytest.mark.long
def test_an_unchecked_lineage_on_a_remote_mount_is_still_held_to_the_catalogs_etag(
        tmp_path: Path, s3_remote: S3Remote) -> None:
    """A catalog whose backup has no checksum file (an earlier version's, or one written
    by hand) leaves the mount's reads unchecked block by block; an image replaced by
    other bytes of the same size must then be refused by the ETag the catalog records
    (the listing has it for free), not served."""
    import errno
    import json

    from tests.test_remote_mount import RemoteMount

    s3 = s3_remote
    disk, repo = pushed_full(tmp_path, s3, "vm1", 4 * MiB)
    (ident,) = [b["id"] for b in json.loads(cli("list", repo, "vm1", "--json").stdout)]
    snap = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/catalog/0000000001.json")["Body"]
                      .read())
    snap["number"] = 2
    snap["backups"][0]["checksums"] = None
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/catalog/0000000002.json",
                         Body=json.dumps(snap).encode())
    key = f"{s3.prefix}/devices/vm1/{ident}.qcow2"
    body = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    at = len(body) - MiB  # guest data, not the header or tables
    body[at:at + 4096] = bytes(b ^ 0xFF for b in body[at:at + 4096])
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))

    remote = RemoteMount(s3, tmp_path / "remote", tmp_path / "cache")
    try:
        remote.start()
        with pytest.raises(OSError) as e:
            with open(remote.mnt / "vm1" / "backups" / ident, "rb") as f:
                f.read()
        assert e.value.errno == errno.EIO
        remote.stop()
    finally:
        remote.cleanup()
    assert "Traceback" not in remote.log()
