"""`backupfs mount s3://BUCKET/PREFIX MOUNT`: a remote's backups read by ranged GETs.

Against the real radosgw (the ``s3_remote`` fixture): a small repository
pushed, its remote mounted, each backup file compared with the local
mount's; a second read served from the cache (the cache's own record of
what it fetched, not timing); the cache kept under a tiny cache_size; an
endpoint that stops answering (a TCP relay of the test's own, stopped)
gives EIO in bounded time and the mount still unmounts; nothing writable.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.cli import main as cli_main
from backupfs.mountinfo import wait_for_exit
from tests.cephcluster import CephCluster
from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.mounts import Mounted, _is_mounted
from tests.s3remote import S3Remote
from tests.users import OtherUser

pytestmark = [pytest.mark.mount, pytest.mark.long]

MiB = 1 << 20


class RemoteMount:
    """`backupfs mount s3://...` for one test; unmounted (and its daemon gone) in cleanup."""

    def __init__(self, s3: S3Remote, mnt: Path, cache: Path, options: str = "", endpoint: str | None = None,
                 read_timeout: float | None = None) -> None:
        self.s3, self.mnt, self.cache = s3, mnt, cache
        self.options = f"cache={cache}" + (f",{options}" if options else "")
        self.endpoint = endpoint
        self.read_timeout = read_timeout
        self.pid: int | None = None

    def start(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        args = ["mount", self.s3.url, str(self.mnt), "-o", self.options]
        if self.endpoint:
            args += ["--endpoint", self.endpoint]
        env = self.s3.env()
        if self.read_timeout is not None:
            env["BACKUPFS_S3_READ_TIMEOUT"] = str(self.read_timeout)
        self.s3.cli(*args, timeout=60, env=env)
        self.pid = json.loads((self.cache / "mount.json").read_text())["pid"]

    def log(self) -> str:
        try:
            return (self.cache / "backupfs.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        proc = subprocess.run(backupfs_cmd() + ["umount", str(self.mnt)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        if self.pid is not None:
            assert wait_for_exit(self.pid, 0), "umount returned before the remote mount's daemon exited"
            self.pid = None

    def cleanup(self) -> None:
        if _is_mounted(self.mnt):
            subprocess.run(backupfs_cmd() + ["umount", str(self.mnt)], capture_output=True, timeout=60)
        if _is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        if self.pid is not None and not wait_for_exit(self.pid, 30):
            os.kill(self.pid, 9)
            wait_for_exit(self.pid, 30)
        self.pid = None


def _dirty(disk: Path, offset: int, length: int) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))


@pytest.fixture(scope="module")
def s3_remote(module_s3_remote: S3Remote) -> S3Remote:
    """A module's tests (and the ``relay`` in front of it) share one bucket: they
    only read what one pushed repository put there (``pushed`` here; the files
    view's tests, tests/test_remote_files.py, import this for theirs)."""
    return module_s3_remote


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, s3_remote: S3Remote) -> tuple[Path, list[str]]:
    """``push_small_repo`` once for the module's tests: each took 2 s to build and push."""
    return push_small_repo(tmp_path_factory.mktemp("pushed"), s3_remote)


def push_small_repo(tmp_path: Path, s3_remote: S3Remote) -> tuple[Path, list[str]]:
    """A repository with a 24 MiB device, a full and an incremental, pushed; its backup ids."""
    disk = tmp_path / "disk"
    data = bytearray(os.urandom(24 * MiB))
    data[8 * MiB:12 * MiB] = bytes(4 * MiB)  # a hole in the guest: zeros, not stored
    disk.write_bytes(data)
    repo = repo_with_a_full(tmp_path / "repo", "vm1", disk)
    _dirty(disk, 3 * MiB, 512 * 1024)
    _dirty(disk, 20 * MiB, 64 * 1024)
    cli("backup", repo, "vm1", "incremental")
    cli("remote", "add", repo, "off", s3_remote.url)
    s3_remote.cli("push", repo, "off")
    ids = [b["id"] for b in json.loads(cli("list", repo, "vm1", "--json").stdout)]
    assert len(ids) == 2
    return repo, ids


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_remote_mount_serves_the_local_bytes_then_from_the_cache(pushed: tuple[Path, list[str]],
                                                                 s3_remote: S3Remote, tmp_path: Path) -> None:
    repo, ids = pushed
    local = Mounted(repo, tmp_path / "local")
    (tmp_path / "local").mkdir()
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache")
    try:
        local.start()
        remote.start()
        assert sorted(os.listdir(remote.mnt)) == ["vm1"]
        # No device, snapshot, bitmap.
        assert sorted(os.listdir(remote.mnt / "vm1")) == ["backups", "chain", "changes", "files", "versions"]
        assert sorted(os.listdir(remote.mnt / "vm1" / "backups")) == sorted(ids + ["latest"])
        assert os.readlink(remote.mnt / "vm1" / "backups" / "latest") == ids[-1]
        assert _read(remote.mnt / "vm1" / "chain") == _read(local.path("vm1", "chain"))
        for ident in ids:
            r, l = remote.mnt / "vm1" / "backups" / ident, local.path("vm1", "backups", ident)
            rs, ls = os.stat(r), os.stat(l)
            assert (rs.st_size, rs.st_mtime_ns, rs.st_blocks) == (ls.st_size, ls.st_mtime_ns, ls.st_blocks)
            assert os.listxattr(r) == os.listxattr(l)
            for name in os.listxattr(l):
                assert os.getxattr(r, name) == os.getxattr(l, name), name
            subprocess.run(["cmp", str(r), str(l)], check=True, timeout=120)
        assert _gets(remote) > 0
        # A second read, by a new mount of the same cache (no page cache left): every
        # byte from the cache on disk, no GET.
        remote.stop()
        remote.start()
        for ident in ids:
            subprocess.run(["cmp", str(remote.mnt / "vm1" / "backups" / ident),
                            str(local.path("vm1", "backups", ident))], check=True, timeout=120)
        assert _gets(remote) == 0
        # Nothing in the tree is writable.
        target = remote.mnt / "vm1" / "backups" / ids[0]
        for attempt in (lambda: open(target, "r+b"), lambda: (remote.mnt / "vm1" / "x").write_bytes(b"x"),
                        lambda: os.mkdir(remote.mnt / "new"), lambda: os.unlink(target),
                        lambda: os.setxattr(target, "user.x", b"1")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        remote.stop()
        local.stop()
        assert "Traceback" not in remote.log()
    finally:
        remote.cleanup()
        local.cleanup()


def _gets(remote: RemoteMount) -> int:
    """The GETs the daemon made so far, as it reports them in user.backupfs.remote_gets of the root."""
    return int(os.getxattr(remote.mnt, "user.backupfs.remote_gets"))


def test_the_cache_stays_under_cache_size(pushed: tuple[Path, list[str]], s3_remote: S3Remote,
                                          tmp_path: Path) -> None:
    repo, ids = pushed
    local = tmp_path / "local.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(repo / "devices" / "vm1" / f"{ids[-1]}.qcow2"),
                    str(local)], check=True, timeout=120)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    stale = cache / ("0" * 40 + ".data")  # an object an earlier mount cached, gone from the remote since
    stale.write_bytes(os.urandom(8 * MiB))
    remote = RemoteMount(s3_remote, tmp_path / "remote", cache, options="cache_size=16M")
    try:
        remote.start()
        for _ in range(2):  # the image is larger than the cache: the second pass evicts and fetches again
            subprocess.run(["cmp", str(remote.mnt / "vm1" / "backups" / ids[-1]), str(local)], check=True,
                           timeout=120)
            used = sum(os.stat(p).st_blocks * 512 for p in cache.glob("*.data"))
            assert used <= 16 * MiB, used
        assert not stale.exists()  # counted against the limit, and evicted first
        stored = sum(os.stat(p).st_size for p in (repo / "devices" / "vm1").glob("*.qcow2"))
        assert stored > 16 * MiB  # the test means something: the chain does not fit
        assert _gets(remote) * 4 * MiB >= stored
        assert oct(os.stat(cache).st_mode & 0o777) == oct(0o700)
        remote.stop()
        assert "Traceback" not in remote.log()
    finally:
        remote.cleanup()


TRICKLE_PACE = 0.5  # seconds between two bytes of a trickled answer
OVERSIZE = 256 * MiB  # what an oversize answer claims, and sends unless the client hangs up


class Relay:
    """A TCP relay from a local port to the endpoint, that the test can stop: an
    endpoint that stops answering mid-mount (connections then refused)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = threading.Event()
        self.frozen = threading.Event()  # connections taken and requests read, nothing answered
        # Answers sent a byte every TRICKLE_PACE s: each wait shorter than any read
        # timeout, the whole answer never (a server or middlebox that stalls, connection kept).
        self.trickling = threading.Event()
        # Each answer replaced by a broken one (its headers cut short), the connection closed.
        self.garbling = threading.Event()
        # Each answer replaced by one that claims OVERSIZE bytes and sends zeros until the
        # client hangs up (a server that ignores the range, or a hostile one): bytes sent counted.
        self.oversize = threading.Event()
        self.oversize_sent = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.frozen.is_set():  # taken, never answered
                self.conns.append(client)
                continue
            upstream = socket.create_connection(self.target, timeout=10)
            self.conns += [client, upstream]
            for a, b, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, answers), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, answers: bool = False) -> None:
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                if self.frozen.is_set():
                    self.stopped.wait()  # an endpoint that stopped answering, connection open
                    break
                if answers and self.oversize.is_set():
                    self._send_oversize(b)
                    break
                if answers and self.garbling.is_set():
                    b.sendall(b"HTTP/1.1 200 OK\r\nCont")
                    break
                if answers and self.trickling.is_set():
                    for i in range(len(data)):  # the pace of a stalled server, not a synchronisation
                        if self.stopped.wait(TRICKLE_PACE):
                            return
                        b.sendall(data[i:i + 1])
                    continue
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _send_oversize(self, b: socket.socket) -> None:
        b.sendall(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {OVERSIZE}\r\n"
                  f"Content-Range: bytes 0-{OVERSIZE - 1}/{OVERSIZE}\r\n\r\n".encode())
        zeros = bytes(MiB)
        while self.oversize_sent < OVERSIZE and not self.stopped.is_set():
            b.sendall(zeros)  # OSError once the client has hung up
            self.oversize_sent += len(zeros)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        self.server.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


@pytest.fixture
def relay(s3_remote: S3Remote) -> Iterator[Relay]:
    from urllib.parse import urlparse

    u = urlparse(s3_remote.cluster.endpoint)
    r = Relay((u.hostname or "127.0.0.1", u.port or 80))
    try:
        yield r
    finally:
        r.stop()


def test_an_endpoint_that_stops_answering_gives_eio_in_bounded_time(pushed: tuple[Path, list[str]],
                                                                     s3_remote: S3Remote, tmp_path: Path,
                                                                     relay: Relay) -> None:
    _, ids = pushed
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache",
                         endpoint=f"http://127.0.0.1:{relay.port}")
    try:
        remote.start()
        backup = remote.mnt / "vm1" / "backups" / ids[-1]
        fd = os.open(backup, os.O_RDONLY)  # its chain opened (headers, tables) through the relay
        try:
            relay.stop()
            started = time.monotonic()
            with pytest.raises(OSError) as e:
                os.pread(fd, 64 * 1024, 23 * MiB)  # data the open did not fetch
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert time.monotonic() - started < 60
        assert os.listdir(remote.mnt / "vm1" / "backups")  # the mount still serves
        remote.stop()
        log = remote.log()
        assert "Traceback" not in log
        assert f"devices/vm1/{ids[0]}.qcow2" in log and "bytes " in log  # the object and where
        # Mounting through the dead endpoint: one line naming it, in bounded time.
        started = time.monotonic()
        proc = s3_remote.cli("mount", s3_remote.url, remote.mnt, "-o", f"cache={tmp_path / 'cache'}",
                             "--endpoint", f"http://127.0.0.1:{relay.port}", check=False, timeout=90)
        assert proc.returncode != 0 and not _is_mounted(remote.mnt)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"cannot reach the endpoint http://127.0.0.1:{relay.port}" in proc.stderr
        assert time.monotonic() - started < 60
    finally:
        remote.cleanup()


def test_a_damaged_object_reads_as_eio_not_wrong_bytes(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """A block of the full rewritten at the server with other bytes of the same size
    (bit rot, or a hand's edit before the mount): the remote's checksum files catch it.
    Its own bucket: the module's shared one must stay as pushed."""
    s3_remote = S3Remote.make(ceph_cluster)
    try:
        _damaged_object_is_eio(s3_remote, tmp_path)
    finally:
        s3_remote.remove()


def _damaged_object_is_eio(s3_remote: S3Remote, tmp_path: Path) -> None:
    repo, ids = push_small_repo(tmp_path, s3_remote)
    key = f"{s3_remote.prefix}/devices/vm1/{ids[0]}.qcow2"
    body = bytearray(s3_remote.client.get_object(Bucket=s3_remote.bucket, Key=key)["Body"].read())
    local = (repo / "devices" / "vm1" / f"{ids[0]}.qcow2").read_bytes()
    assert bytes(body) == local
    damaged_at = len(body) - 2 * MiB  # data, not the header or tables at the start
    body[damaged_at:damaged_at + 4096] = bytes(b ^ 0xFF for b in body[damaged_at:damaged_at + 4096])
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=key, Body=bytes(body))
    raw = tmp_path / "latest.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(repo / "devices" / "vm1" / f"{ids[-1]}.qcow2"),
                    str(raw)], check=True, timeout=120)
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache")
    try:
        remote.start()
        backup = remote.mnt / "vm1" / "backups" / ids[-1]
        with pytest.raises(OSError) as e:
            _read(backup)
        assert e.value.errno == errno.EIO
        assert "checksum" in os.getxattr(backup, "user.backupfs.read_error").decode()
        # What is not damaged still reads right.
        with open(backup, "rb") as f, open(raw, "rb") as r:
            assert f.read(MiB) == r.read(MiB)
        remote.stop()
    finally:
        remote.cleanup()


def test_an_endpoint_that_hangs_gives_eio_after_the_read_timeout(pushed: tuple[Path, list[str]],
                                                                 s3_remote: S3Remote, tmp_path: Path,
                                                                 relay: Relay) -> None:
    """Connections taken, requests never answered (a frozen radosgw): the read waits
    the mount's read timeout and its retry (backupfs/remotemount.py), then EIO; the
    mount still lists and unmounts."""
    _, ids = pushed
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache",
                         endpoint=f"http://127.0.0.1:{relay.port}", read_timeout=2)
    try:
        remote.start()
        fd = os.open(remote.mnt / "vm1" / "backups" / ids[-1], os.O_RDONLY)
        try:
            relay.frozen.set()
            started = time.monotonic()
            with pytest.raises(OSError) as e:
                os.pread(fd, 64 * 1024, 23 * MiB)
            took = time.monotonic() - started
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert 2 < took < 60, took
        assert os.listdir(remote.mnt / "vm1" / "backups")
        remote.stop()
        assert "stopped answering" in remote.log()
    finally:
        relay.stop()
        remote.cleanup()


def test_remote_mount_options_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    for options, says in (("cache_size=1M", "below the smallest cache"), ("cache_size=lots", "is not a size"),
                          ("allow_group=0", "not one a remote mount takes")):
        proc = cli("mount", "s3://bkt/p", tmp_path / "mnt", "-o", options, check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and says in err and len(err.strip().splitlines()) == 1, err
    proc = cli("mount", tmp_path, tmp_path / "mnt", "--endpoint", "http://127.0.0.1:1", check=False)
    assert "--endpoint goes with an s3:// URL" in proc.stderr.decode()


@contextlib.contextmanager
def local_and_remote(repo: Path, s3_remote: S3Remote, tmp_path: Path) -> Iterator[tuple[Mounted, RemoteMount]]:
    """``repo`` mounted here and its remote copy mounted beside it, both started;
    both cleaned up after, whatever happened."""
    (tmp_path / "local").mkdir()
    local = Mounted(repo, tmp_path / "local")
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache")
    try:
        local.start()
        remote.start()
        yield local, remote
    finally:
        remote.cleanup()
        local.cleanup()


def test_another_users_mounts_are_listed_as_theirs_not_as_dead(pushed: tuple[Path, list[str]], s3_remote: S3Remote,
                                                               tmp_path: Path, other_user: OtherUser) -> None:
    """`backupfs mount` run by someone else lists the backupfs mounts it can see; it cannot
    read a remote mount's runtime record (the mounter's), so it must say whose the mount
    is, not that its daemon is gone (and send them to `umount`)."""
    repo, _ = pushed
    with local_and_remote(repo, s3_remote, tmp_path) as (local, remote):
        # As the other user (this interpreter is not theirs to run: our effective uid is
        # theirs for the call, as their own `backupfs mount` would run).
        import ctypes.util  # noqa: F401 - what the command imports late: our interpreter's files are ours alone

        out = io.StringIO()
        os.setegid(other_user.gid)
        os.seteuid(other_user.uid)
        try:
            with contextlib.redirect_stdout(out):
                status = cli_main(["mount"])
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert status == 0
        lines = [ln for ln in out.getvalue().splitlines() if str(tmp_path) in ln]
        assert not [ln for ln in lines if "dead mount" in ln], out.getvalue()
        # (The local mount's repository is beyond their reach: not listed at all.)
        assert f"{s3_remote.url} on {remote.mnt} (another user's mount: uid {os.geteuid()})" in lines, lines
        # The mounter's own listing still names each daemon.
        own = s3_remote.cli("mount").stdout
        assert f"on {remote.mnt} (daemon pid {remote.pid}; " in own, own
        remote.stop()
        local.stop()


@contextlib.contextmanager
def _latest_read_is_eio(pushed: tuple[Path, list[str]], s3_remote: S3Remote, tmp_path: Path, relay: Relay,
                        fault: threading.Event) -> Iterator[RemoteMount]:
    """The remote mounted through ``relay``, ``fault`` set on it, the newest backup
    read: EIO. The mount, for what the test checks next; cleaned up after."""
    _, ids = pushed
    remote = RemoteMount(s3_remote, tmp_path / "remote", tmp_path / "cache",
                         endpoint=f"http://127.0.0.1:{relay.port}", read_timeout=2)
    try:
        remote.start()
        fault.set()
        with pytest.raises(OSError) as e:
            _read(remote.mnt / "vm1" / "backups" / ids[-1])
        assert e.value.errno == errno.EIO
        yield remote
    finally:
        remote.cleanup()


def test_an_endpoint_whose_answers_are_broken_gives_eio_and_one_line_each_in_the_log(
        pushed: tuple[Path, list[str]], s3_remote: S3Remote, tmp_path: Path, relay: Relay) -> None:
    """A remote (or a middlebox) that answers with headers cut short: the read is EIO,
    and what the HTTP library says of it is a line of the daemon's log, not a traceback."""
    with _latest_read_is_eio(pushed, s3_remote, tmp_path, relay, relay.garbling) as remote:
        remote.stop()
        log = remote.log()
        assert "Failed to parse headers" in log  # the library's word, kept
        assert "Traceback" not in log


def test_an_answer_longer_than_the_range_asked_is_not_read_to_its_end(
        pushed: tuple[Path, list[str]], s3_remote: S3Remote, tmp_path: Path, relay: Relay) -> None:
    """An endpoint that answers a ranged GET with far more than the range (a server or
    proxy that ignores Range, or a hostile one): the read is EIO once one byte more
    than asked has come, not after the whole answer is held in the daemon's memory."""
    with _latest_read_is_eio(pushed, s3_remote, tmp_path, relay, relay.oversize) as remote:
        # Each GET asks 8 MiB at most, and a few may be in flight: far below what was offered.
        assert relay.oversize_sent < OVERSIZE // 4, relay.oversize_sent
        remote.stop()
        assert "Traceback" not in remote.log()
