"""Off-site copies on S3 (engine/remote/), against a real radosgw.

Every test drives the installed `backupfs` from a subprocess with the
bucket's credentials in its environment (tests/s3remote.py), and checks the
bucket through the S3 API and the bytes with a local restore as the oracle.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.s3remote import S3Remote, kill_push_when

MiB = 1 << 20


def _random_disk(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _dirty(disk: Path, offset: int, length: int = 256 * 1024) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))


def _summary(text: str) -> dict[str, int]:
    """The counts `push` reports."""
    m = re.search(r"(\d+) backups, (\d+) objects uploaded \((\d+) bytes\), (\d+) found from an interrupted push, "
                  r"(\d+) backups already current, (\d+) objects deleted", text)
    assert m, text
    return dict(zip(("backups", "uploaded", "bytes", "resumed", "current", "deleted"), map(int, m.groups())))


def _listed(s3: S3Remote, where: str | Path) -> list[tuple[str, str, str | None]]:
    out = json.loads(s3.cli("list", where, "--json").stdout)
    return [(b["id"], b["kind"], b["parent"]) for b in out]


def _restores_equal(s3: S3Remote, repo: Path, tmp: Path, device: str) -> int:
    """Every backup of ``device`` restored from the remote equals its local restore; how many."""
    ids = [b["id"] for b in json.loads(cli("list", repo, device, "--json").stdout)]
    for ident in ids:
        local, remote = tmp / f"local-{ident}", tmp / f"remote-{ident}"
        cli("restore", repo, device, ident, local)
        s3.cli("restore", s3.url, device, ident, remote)
        assert local.read_bytes() == remote.read_bytes(), ident
        local.unlink()
        remote.unlink()
    return len(ids)


@pytest.fixture
def pushed_repo(tmp_path: Path, s3_remote: S3Remote) -> Path:
    """A repository with a 20 MiB device (its full goes up in a multipart upload) and
    an incremental, and the remote recorded as `off`."""
    disk = _random_disk(tmp_path / "disk", 20 * MiB)
    repo = repo_with_a_full(tmp_path / "repo", "vm1", disk)
    _dirty(disk, 3 * MiB)
    cli("backup", repo, "vm1", "incremental")
    cli("remote", "add", repo, "off", s3_remote.url)
    return repo


def test_push_then_push_again_uploads_nothing(pushed_repo: Path, s3_remote: S3Remote, tmp_path: Path) -> None:
    first = _summary(s3_remote.cli("push", pushed_repo, "off").stdout)
    assert first["backups"] == 2 and first["uploaded"] == 4 and first["current"] == 0
    keys = s3_remote.keys()
    local = {str(p.relative_to(pushed_repo)): p.stat().st_size
             for p in (pushed_repo / "devices" / "vm1").iterdir() if p.suffix in (".qcow2", ".sums")}
    assert {k: v for k, v in keys.items() if k.startswith("devices/")} == local
    assert "catalog/0000000001.json" in keys and _lock_released(s3_remote)
    form = json.loads(s3_remote.client.get_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/"
                                                  "backupfs-remote.json")["Body"].read())
    assert form["format"] == 1 and len(form["origin"]) == 32

    again = s3_remote.cli("push", pushed_repo, "off").stdout
    assert _summary(again)["uploaded"] == 0 and _summary(again)["current"] == 2
    assert "the remote's catalog was current" in again
    # No new catalog snapshot either; only the lock moved on (its released marker).
    assert _without_lock(s3_remote.keys()) == _without_lock(keys) and _lock_released(s3_remote)

    # The remote lists as the repository does, directly and from a copy of its prefix.
    expected = _listed(s3_remote, pushed_repo)
    assert _listed(s3_remote, s3_remote.url) == expected
    copy = s3_remote.download(tmp_path / "copy")
    assert _listed(s3_remote, copy) == expected
    assert not (copy / "catalog.db").exists()  # listing the copy wrote nothing there
    assert s3_remote.cli("verify", s3_remote.url).returncode == 0
    assert _restores_equal(s3_remote, pushed_repo, tmp_path, "vm1") == 2


def test_a_new_backup_pushes_only_itself(pushed_repo: Path, s3_remote: S3Remote, tmp_path: Path) -> None:
    s3_remote.cli("push", pushed_repo, "off")
    _dirty(tmp_path / "disk", 9 * MiB)
    cli("backup", pushed_repo, "vm1", "incremental")
    counts = _summary(s3_remote.cli("push", pushed_repo, "off").stdout)
    assert (counts["uploaded"], counts["current"]) == (2, 2)
    assert "catalog/0000000002.json" in s3_remote.keys()
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, pushed_repo)


def test_a_damaged_object_is_found_by_verify(pushed_repo: Path, s3_remote: S3Remote, tmp_path: Path) -> None:
    s3_remote.cli("push", pushed_repo, "off")
    incr = next(k for k in s3_remote.keys() if k.endswith("incremental.qcow2"))
    good = s3_remote.client.get_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{incr}")["Body"].read()
    body = bytearray(good)
    body[len(body) // 2] ^= 0xFF  # same size, one byte changed
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{incr}", Body=bytes(body))
    proc = s3_remote.cli("verify", s3_remote.url, "vm1", check=False)
    assert proc.returncode == 1
    assert f"{incr} is damaged" in proc.stdout and "1 damaged" in proc.stdout
    report = json.loads(s3_remote.cli("verify", s3_remote.url, "--json", check=False).stdout)
    incr_id = incr.rpartition("/")[2].removesuffix(".qcow2")
    assert report["ok"] is False and report["bad"] == [incr_id] and len(report["checked"]) == 2
    # The full it reads through verifies on its own.
    full = [b for b in report["checked"] if b != incr_id][0]
    assert s3_remote.cli("verify", s3_remote.url, "vm1", "--backup", full).returncode == 0
    # Mended, and the full cut short instead: the incremental reads through it.
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{incr}", Body=good)
    full_key = f"{s3_remote.prefix}/devices/vm1/{full}.qcow2"
    head = s3_remote.client.get_object(Bucket=s3_remote.bucket, Key=full_key, Range="bytes=0-65535")["Body"].read()
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=full_key, Body=head)
    report = json.loads(s3_remote.cli("verify", s3_remote.url, "--json", check=False).stdout)
    assert report["bad"] == sorted([full, incr_id])
    assert [(p["backup"], p["inherited"]) for p in report["problems"]] == [(full, False), (incr_id, True)]
    assert "65536 bytes, the catalog records" in report["problems"][0]["problem"]
    assert "delete the damaged objects" in report["advice"][0]
    # A restore through it fails in one line naming the object, and leaves no file behind.
    target = tmp_path / "restored.raw"
    proc = s3_remote.cli("restore", s3_remote.url, "vm1", "latest", target, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{full}.qcow2 is damaged" in proc.stderr
    assert not target.exists()
    # Repaired as the advice says: the damaged object deleted, a push sends it again.
    s3_remote.client.delete_object(Bucket=s3_remote.bucket, Key=full_key)
    assert _summary(s3_remote.cli("push", pushed_repo, "off").stdout)["uploaded"] == 1
    assert s3_remote.cli("verify", s3_remote.url).returncode == 0


def test_prune_then_push_keeps_every_remote_backup_readable(pushed_repo: Path, s3_remote: S3Remote,
                                                            tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    _dirty(disk, 11 * MiB)
    cli("backup", pushed_repo, "vm1", "incremental")
    s3_remote.cli("push", pushed_repo, "off")
    before = s3_remote.keys()
    cli("prune", pushed_repo, "vm1", "--remove", "0001")  # rewrites 0002 in place, under its name
    counts = _summary(s3_remote.cli("push", pushed_repo, "off").stdout)
    # 0002 went up again under a new key; 0003 was current; 0001's objects and 0002's old ones went.
    assert (counts["uploaded"], counts["current"], counts["deleted"]) == (2, 1, 4)
    after = s3_remote.keys()
    rewritten = [k for k in after if ".r1." in k]
    assert sorted(rewritten) == sorted(k.replace("incremental.", "incremental.r1.")
                                      for k in before if "0002-incremental." in k)
    assert not any("0001-full" in k for k in after)
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, pushed_repo)
    assert _restores_equal(s3_remote, pushed_repo, tmp_path, "vm1") == 2
    # What the old catalog named was deleted only after the new one was written,
    # and only the last few snapshots are kept.
    assert {k for k in after if k.startswith("catalog/")} == {"catalog/0000000001.json", "catalog/0000000002.json"}


def test_kill_mid_push_then_resume(tmp_path: Path, s3_remote: S3Remote) -> None:
    disks = {name: _random_disk(tmp_path / f"disk-{name}", 24 * MiB) for name in ("a", "b", "c")}
    repo = repo_with_a_full(tmp_path / "repo", "a", disks["a"])
    cli("remote", "add", repo, "off", s3_remote.url)
    s3_remote.cli("push", repo, "off")
    for name in ("b", "c"):
        cli("device", "add", repo, name, disks[name])
        cli("backup", repo, name, "full")
    listed_before = _listed(s3_remote, s3_remote.url)

    kill_push_when(repo, s3_remote, lambda keys: any(k.startswith("devices/b/") for k in keys))  # b's image is up
    keys = s3_remote.keys()
    assert "catalog/0000000002.json" not in keys  # the catalog is written last
    assert len(_lock_objects(s3_remote)) == 1 and not _lock_released(s3_remote)  # the killed push's
    # The remote still reads as it was: its newest complete catalog names only what exists.
    assert _listed(s3_remote, s3_remote.url) == listed_before
    assert s3_remote.cli("verify", s3_remote.url).returncode == 0

    present = [k for k in keys if k.startswith(("devices/b/", "devices/c/"))]
    counts = _summary(s3_remote.cli("push", repo, "off").stdout)  # takes over the dead push's lock
    assert counts["resumed"] == len(present) and counts["uploaded"] == 4 - len(present)
    assert counts["current"] == 1
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, repo)
    assert _lock_released(s3_remote)
    assert s3_remote.cli("verify", s3_remote.url).returncode == 0


def _plant_lock(s3: S3Remote, renewed: float, host: str = "elsewhere.example", pid: int = 4242,
                key: str = "lock/0000000007.json") -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{key}", Body=json.dumps(
        {"host": host, "pid": pid, "token": "x", "renewed": renewed, "lease_seconds": 300}).encode())


def _lock_objects(s3: S3Remote) -> list[str]:
    """The lock's objects on the remote (lock/NNNNNNNNNN.json), oldest first."""
    return sorted(k for k in s3.keys() if k.startswith("lock/"))


def _without_lock(keys: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in keys.items() if not k.startswith("lock/")}


def _lock_released(s3: S3Remote) -> bool:
    """The lock is one object, saying released: what a push's end leaves (the newest
    number is never deleted, so that numbers never start again)."""
    keys = _lock_objects(s3)
    if len(keys) != 1:
        return False
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{keys[0]}")["Body"].read()
    return json.loads(body).get("released") is True


@pytest.mark.parametrize("key", ["lock/0000000007.json", "lock.json"])  # lock.json: older backupfs
def test_another_hosts_lock_refuses_and_a_stale_one_is_taken_over(pushed_repo: Path, s3_remote: S3Remote,
                                                                  key: str) -> None:
    s3_remote.cli("push", pushed_repo, "off")
    _plant_lock(s3_remote, time.time(), key=key)  # a push running on another host
    cli("backup", pushed_repo, "vm1", "incremental", "--allow-empty")
    proc = s3_remote.cli("push", pushed_repo, "off", check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "another push holds the remote's lock (elsewhere.example pid 4242" in err
    assert "catalog/0000000002.json" not in s3_remote.keys()
    # A lock whose lease ran out is taken over, and released at the end.
    _plant_lock(s3_remote, time.time() - 3600, key=key)
    assert _summary(s3_remote.cli("push", pushed_repo, "off").stdout)["uploaded"] == 2
    assert _lock_released(s3_remote) and "lock.json" not in s3_remote.keys()


def test_push_from_a_directory_copy_device_filter(pushed_repo: Path, s3_remote: S3Remote, tmp_path: Path) -> None:
    """`push REPO NAME DEVICE` sends only that device and keeps the remote's others."""
    other = _random_disk(tmp_path / "disk2", 2 * MiB)
    cli("device", "add", pushed_repo, "vm2", other)
    cli("backup", pushed_repo, "vm2", "full")
    s3_remote.cli("push", pushed_repo, "off", "vm2")
    assert {b[0] for b in _listed(s3_remote, s3_remote.url)} == {
        b["id"] for b in json.loads(cli("list", pushed_repo, "vm2", "--json").stdout)}
    s3_remote.cli("push", pushed_repo, "off", "vm1")
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, pushed_repo)


def _one_line_in_time(s3: S3Remote, args: list[str], env: dict[str, str], seconds: float) -> str:
    started = time.monotonic()
    proc = s3.cli(*args, check=False, env=env, timeout=seconds + 30)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert took < seconds, f"took {took:.1f} s: {lines[0]}"
    assert s3.cluster.secret_key not in proc.stderr + proc.stdout
    return lines[0]


def test_wrong_credentials_unknown_bucket_unreachable_endpoint(pushed_repo: Path, s3_remote: S3Remote) -> None:
    wrong = s3_remote.env(AWS_SECRET_ACCESS_KEY="not-the-secret-" + "0" * 24)
    line = _one_line_in_time(s3_remote, ["push", str(pushed_repo), "off"], wrong, 20)
    assert "remote off (" in line and "refused the S3 credentials" in line
    line = _one_line_in_time(s3_remote, ["list", s3_remote.url], wrong, 20)
    assert "refused the S3 credentials" in line

    cli("remote", "add", pushed_repo, "nobucket", f"s3://{s3_remote.bucket}-none/x")
    line = _one_line_in_time(s3_remote, ["push", str(pushed_repo), "nobucket"], s3_remote.env(), 20)
    assert "remote nobucket" in line and "does not exist" in line

    with socket.socket() as s:  # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli("remote", "add", pushed_repo, "gone", s3_remote.url, "--endpoint", f"http://127.0.0.1:{port}")
    line = _one_line_in_time(s3_remote, ["push", str(pushed_repo), "gone"], s3_remote.env(), 30)
    assert "remote gone" in line and f"cannot reach the endpoint http://127.0.0.1:{port}" in line
    no_keys = {k: v for k, v in s3_remote.env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    line = _one_line_in_time(s3_remote, ["list", s3_remote.url], no_keys, 30)
    assert "no S3 credentials found" in line

    assert s3_remote.cluster.secret_key not in os.environ.values()  # only the commands had them


@pytest.mark.mount
def test_push_beside_a_mount(tmp_path: Path, s3_remote: S3Remote) -> None:
    """Mounted, the repository is the daemon's: `remote add` and `push` work beside it,
    and a backup taken through the trigger goes up with the next push."""
    from tests.mounts import mounted_device

    with mounted_device(tmp_path, os.urandom(4 * MiB)) as m:
        (m.path("vm1", "snapshot")).write_text("full\n")
        cli("remote", "add", m.repo, "off", s3_remote.url)
        assert json.loads(cli("remote", "list", m.repo, "--json").stdout) == [
            {"name": "off", "url": s3_remote.url, "endpoint": None, "region": None}]
        assert _summary(s3_remote.cli("push", m.repo, "off").stdout)["uploaded"] == 2
        with open(m.src, "r+b") as f:  # type: ignore[attr-defined]
            f.write(os.urandom(4096))
        (m.path("vm1", "snapshot")).write_text("incremental\n")
        counts = _summary(s3_remote.cli("push", m.repo, "off").stdout)
        assert (counts["uploaded"], counts["current"]) == (2, 1)
        latest = tmp_path / "latest.raw"
        s3_remote.cli("restore", s3_remote.url, "vm1", "latest", latest)
        assert latest.read_bytes() == m.path("vm1", "backups", "latest").read_bytes()
        m.stop()


def test_another_repository_may_not_push_there(pushed_repo: Path, s3_remote: S3Remote, tmp_path: Path) -> None:
    """Its push would make the remote mirror it, deleting the first repository's backups."""
    s3_remote.cli("push", pushed_repo, "off")
    other = repo_with_a_full(tmp_path / "other", "vm9", _random_disk(tmp_path / "disk9", MiB))
    cli("remote", "add", other, "off", s3_remote.url)
    proc = s3_remote.cli("push", other, "off", check=False)
    assert proc.returncode == 1 and "holds the backups of another repository" in proc.stderr
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, pushed_repo)


def test_files_inside_a_remote_backup(tmp_path: Path, s3_remote: S3Remote) -> None:
    """`ls`, `dump` and `restore --include` of an s3:// remote read the guest's files."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("off site\n")
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(disk)], check=True)
    repo = repo_with_a_full(tmp_path / "repo", "vm1", disk)
    cli("remote", "add", repo, "off", s3_remote.url)
    s3_remote.cli("push", repo, "off")
    listing = s3_remote.cli("ls", s3_remote.url, "vm1", "latest", "disk/etc", "--json").stdout
    assert [e["name"] for e in json.loads(listing)] == ["motd"]
    assert s3_remote.cli("dump", s3_remote.url, "vm1", "latest", "disk/etc/motd").stdout == "off site\n"
    out = tmp_path / "out"
    out.mkdir()
    s3_remote.cli("restore", s3_remote.url, "vm1", "0001", out, "--include", "disk/etc")
    assert (out / "etc" / "motd").read_text() == "off site\n"


def test_two_pushes_at_once(tmp_path: Path, s3_remote: S3Remote) -> None:
    """A push stopped (SIGSTOP) while it holds the lock: a second push is refused,
    naming it; continued, the first finishes as if nothing happened."""
    repo = repo_with_a_full(tmp_path / "repo", "vm1", _random_disk(tmp_path / "disk", 64 * MiB))
    cli("remote", "add", repo, "off", s3_remote.url)
    first = subprocess.Popen(backupfs_cmd() + ["push", str(repo), "off"], env=s3_remote.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _lock_objects(s3_remote):
            assert first.poll() is None, f"the first push ended before it was seen: {first.communicate()}"
            assert time.monotonic() < deadline
        os.kill(first.pid, signal.SIGSTOP)
        try:
            assert "catalog/0000000001.json" not in s3_remote.keys(), "the first push had finished"
            second = s3_remote.cli("push", repo, "off", check=False)
            assert second.returncode == 1
            assert f"another push holds the remote's lock ({socket.gethostname()} pid {first.pid}," in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert _summary(out)["uploaded"] == 2
    finally:
        first.kill()
        first.wait()
    assert _lock_released(s3_remote)
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, repo)
