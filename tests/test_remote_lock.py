"""The remote's lock (engine/remote/lock.py) against a real radosgw: write-once
numbered objects, one holder, and a holder that lost the lock never writes again.

A slow owner is a real process stopped with SIGSTOP while its lease runs out;
the bucket's own object versions are the oracle that nothing was rewritten.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.remote.location import parse_s3_url
from engine.remote.lock import RemoteBusy, RemoteLock
from engine.remote.store import RemoteStore
from tests.commands import cli, repo_with_a_full
from tests.s3remote import S3Remote
from tests.test_remote_push import _lock_released

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent


def _store(s3: S3Remote, monkeypatch: pytest.MonkeyPatch) -> RemoteStore:
    for k, v in s3.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return RemoteStore("remote t", parse_s3_url(s3.url))


def _locks(s3: S3Remote) -> list[str]:
    return sorted(k for k in s3.keys() if k.startswith("lock/"))


def _put(s3: S3Remote, key: str, body: bytes) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{key}", Body=body)


def _owner(host: str = "elsewhere.example", renewed: Any = None, lease: Any = 300) -> bytes:
    return json.dumps({"host": host, "pid": 4242, "token": "x",
                       "renewed": time.time() if renewed is None else renewed, "lease_seconds": lease}).encode()


# A lock holder in its own process, so that the test can stop it (SIGSTOP) as a
# slow owner: it prints its number once held, then answers each "check" line.
HOLDER = """
import sys
from engine.remote.location import parse_s3_url
from engine.remote.lock import RemoteLock
from engine.remote.store import RemoteError, RemoteStore
lock = RemoteLock(RemoteStore("remote t", parse_s3_url(sys.argv[1])), lease=float(sys.argv[2]))
lock.acquire()
print(lock.number, flush=True)
for line in sys.stdin:
    try:
        lock.check()
        print("held", lock.number, flush=True)
    except RemoteError as e:
        print("lost", e, flush=True)
"""


@pytest.mark.parametrize("then", ["took", "renewed", "released"])
def test_a_slow_owner_loses_the_lock_and_never_writes_again(s3_remote: S3Remote, monkeypatch: pytest.MonkeyPatch,
                                                            then: str) -> None:
    """A holds N and is stopped past its lease; B takes over (N+1) and then either
    holds, renews to N+2 (N+1 deleted, so A's create of N+1 would succeed), or
    releases (nothing left, so A's N+1 would be the only object). Woken, A finds
    each time that it lost, writes no lock object that stays, and B's lock is whole."""
    store = _store(s3_remote, monkeypatch)
    a = subprocess.Popen([sys.executable, "-c", HOLDER, s3_remote.url, "1.5"], env=s3_remote.env(),
                         cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    b = RemoteLock(store)
    try:
        assert a.stdout is not None and a.stdin is not None
        n = int(a.stdout.readline())
        os.kill(a.pid, signal.SIGSTOP)
        (held,) = _locks(s3_remote)  # A's newest (it may have renewed before it stopped)
        renewed = json.loads(s3_remote.client.get_object(Bucket=s3_remote.bucket,
                                                         Key=f"{s3_remote.prefix}/{held}")["Body"].read())["renewed"]
        with pytest.raises(RemoteBusy, match="another push holds the remote's lock"):
            b.acquire()  # A's lease is live: refused, though A is stopped
        deadline = time.monotonic() + 30
        while time.time() <= renewed + 1.5:  # the lease itself is what is waited for
            assert time.monotonic() < deadline
        b.acquire()
        assert b.number is not None and b.number > int(held[5:15]) >= n
        taken = b.number
        if then == "renewed":
            b.renew()
        elif then == "released":
            b.release()
        expected = [f"lock/{taken + (then != 'took'):010d}.json"]  # a renewal or the released marker
        assert _locks(s3_remote) == expected
        os.kill(a.pid, signal.SIGCONT)
        a.stdin.write("check\n")
        a.stdin.flush()
        answer = a.stdout.readline()
        assert answer.startswith("lost "), answer
        assert _locks(s3_remote) == expected  # A's stray object (if any) is gone again
        if then != "released":
            b.check()
            b.renew()
            b.release()
        assert _lock_released(s3_remote)
    finally:
        a.kill()
        a.wait()
        b.release()
    assert "Traceback" not in (a.stderr.read() if a.stderr else "")


@pytest.mark.parametrize("before", ["stale", "released", "none"])
def test_of_many_pushes_racing_for_a_free_lock_one_wins(s3_remote: S3Remote, monkeypatch: pytest.MonkeyPatch,
                                                        before: str) -> None:
    """Eight lockers start together against a stale lock object, a released one, or
    none at all: exactly one holds. (Numbering a new lock from the clock, so that
    numbers never start again, let two of them hold it: each made its own key.)"""
    store = _store(s3_remote, monkeypatch)
    if before == "stale":
        _put(s3_remote, "lock/0000000041.json", _owner(renewed=time.time() - 3600))
    elif before == "released":
        _put(s3_remote, "lock/0000000041.json", json.dumps({"released": True}).encode())
    locks = [RemoteLock(store) for _ in range(8)]
    start = threading.Barrier(len(locks))
    outcome: dict[int, str] = {}

    def run(i: int) -> None:
        start.wait()
        try:
            locks[i].acquire()
            outcome[i] = "held"
        except RemoteBusy as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(locks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        winners = [i for i, o in outcome.items() if o == "held"]
        assert len(outcome) == len(locks) and len(winners) == 1, outcome
        assert _locks(s3_remote) == [f"lock/{locks[winners[0]].number:010d}.json"]
        locks[winners[0]].check()
    finally:
        for lock in locks:
            lock.release()
    assert _lock_released(s3_remote)


def test_no_object_is_ever_rewritten(tmp_path: Path, s3_remote: S3Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the bucket versioned, every key a push, a lock renewal, a takeover of a
    dead push's lock and a second push wrote has exactly one version: nothing,
    the lock and the catalog included, was written twice."""
    s3 = s3_remote
    s3.client.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        disk = tmp_path / "disk"
        disk.write_bytes(os.urandom(2 * MiB))
        repo = repo_with_a_full(tmp_path / "repo", "vm1", disk)
        cli("remote", "add", repo, "off", s3.url)
        s3.cli("push", repo, "off")
        lock = RemoteLock(_store(s3, monkeypatch))
        lock.acquire()
        lock.renew()
        lock.renew()
        lock.release()
        dead = {"host": os.uname().nodename, "pid": _dead_pid(), "token": "x", "renewed": time.time(),
                "lease_seconds": 300}  # a push killed here
        _put(s3, "lock/0000000009.json", json.dumps(dead).encode())
        cli("backup", repo, "vm1", "incremental", "--allow-empty")
        s3.cli("push", repo, "off")  # takes the dead push's lock over at once
        versions: dict[str, int] = {}
        for page in s3.client.get_paginator("list_object_versions").paginate(Bucket=s3.bucket,
                                                                             Prefix=s3.prefix + "/"):
            for v in page.get("Versions", []):
                key = v["Key"][len(s3.prefix) + 1:]
                if key != "lock/0000000009.json":  # the test's own
                    versions[key] = versions.get(key, 0) + 1
        assert any(k.startswith("lock/") for k in versions) and "catalog/0000000002.json" in versions
        assert {k: n for k, n in versions.items() if n != 1} == {}
        assert _lock_released(s3)
    finally:
        _remove_versions(s3)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _remove_versions(s3: S3Remote) -> None:
    """Every version and delete marker, so that the fixture can remove the bucket."""
    for page in s3.client.get_paginator("list_object_versions").paginate(Bucket=s3.bucket):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3.client.delete_object(Bucket=s3.bucket, Key=v["Key"], VersionId=v["VersionId"])


def test_hostile_lock_objects_are_one_line_and_never_expired_by_accident(tmp_path: Path,
                                                                         s3_remote: S3Remote) -> None:
    """Someone else's objects under lock/: not JSON, a JSON list, huge, times of the wrong
    type, an absurd pid, keys of other forms, the last number. Each is a one-line
    refusal naming the object (never taken as expired), or ignored and left alone."""
    s3 = s3_remote
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(MiB))
    repo = repo_with_a_full(tmp_path / "repo", "vm1", disk)
    cli("remote", "add", repo, "off", s3.url)
    others = {"lock/12.json": b"x", "lock/00000000099.json": b"x",
              "lock/0000000098.json.bak": b"x", "lock/notes.txt": b"mine"}
    for key, body in others.items():
        _put(s3, key, body)
    key = "lock/0000000005.json"
    cases: list[tuple[bytes, str]] = [
        (b"\x1b[31mnot json", "(an unreadable lock"),
        (b"[1, 2]", "(an unreadable lock"),
        (_owner(renewed="yesterday"), "delete lock/0000000005.json from the remote by hand"),
        (_owner(renewed=True, lease=True), "delete lock/0000000005.json from the remote by hand"),
        (_owner(renewed=-5.0), "delete lock/0000000005.json from the remote by hand"),
        (_owner(host="evil\x1b[2J\nhost"), "(evil\\x1b[2J\\nhost pid 4242"),
        (json.dumps({"host": os.uname().nodename, "pid": 10 ** 40, "token": "x", "renewed": time.time(),
                     "lease_seconds": 300}).encode(), "another push holds the remote's lock"),
        (b" " * (128 << 10), "lock/0000000005.json is larger than 65536 bytes"),
    ]
    for body, expected in cases:
        _put(s3, key, body)
        proc = s3.cli("push", repo, "off", check=False)
        err = proc.stderr.strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and expected in err, (body[:80], err)
        assert "\x1b" not in err
        assert not any(k.startswith("catalog/") for k in s3.keys())
    _put(s3, "lock/9999999999.json", _owner(renewed=time.time() - 3600))
    proc = s3.cli("push", repo, "off", check=False)
    assert proc.returncode == 1 and "the lock's numbers ran out" in proc.stderr, proc.stderr
    s3.client.delete_object(Bucket=s3.bucket, Key=f"{s3.prefix}/lock/9999999999.json")
    _put(s3, key, _owner(renewed=time.time() - 3600))  # stale at last: taken over
    s3.cli("push", repo, "off")
    ours = {k for k in s3.keys() if k.startswith("lock/")} - set(others)
    assert ours == {"lock/0000000007.json"}, ours  # took 6 over 5, released with 7; the others left alone
