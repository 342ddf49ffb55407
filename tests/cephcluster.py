"""A throwaway single-node Ceph cluster (one mon, one memstore OSD, optional radosgw).

RBD sources are tested against a real cluster, not an emulator: librbd's
snapshots, diffs and aio are what the engine relies on, and only the real
daemons show how they behave. Debian's Ceph 16.2 starts here in about two
seconds with its data in RAM (memstore), so the test session starts one
(tests/conftest.py, ``ceph_cluster``) and benchmarks or people start one from
the shell (``scripts/ceph-test-cluster start DIR``). What the steps are and
why is measured in the project's shared notes on Ceph: auth none, a single
copy of each object, a fast paxos interval, and no mgr (health then says
MGR_DOWN, so readiness is judged by the OSD being up and a pool being
writable, never by HEALTH_OK).

Everything the cluster has lives in the directory it is given: ceph.conf,
the mon's store, the OSD's metadata, logs, admin sockets and
``daemons.json`` (the pids, so that ``stop DIR`` from another process stops
what ``start DIR`` started). Only processes this module started are ever
signalled: by their Popen object, or (from another process) by a pidfd of a
recorded pid whose command line names this directory's ceph.conf.

Run as ``python -m tests.cephcluster start DIR [--rgw]`` or ``stop DIR``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

# How long a start may take before it is a failure (it takes about 2 s here).
START_SECONDS = 60.0
# How long one CLI command may take once the cluster is up.
COMMAND_SECONDS = 120.0
# How long a daemon has to exit after SIGTERM before it gets SIGKILL, and
# after SIGKILL before stop() reports it (the OSD exits in well under a
# second while the mon is still up: the order below keeps it so).
TERM_SECONDS = 10.0
KILL_SECONDS = 10.0

# The second pool, for tests that need two pools, and the namespace in `rbd`.
SECOND_POOL = "backupfs-b"
NAMESPACE = "ns1"
# radosgw's pools, made up front: the first bucket would otherwise make
# them one by one and cost seconds.
RGW_POOLS = (".rgw.root", "default.rgw.log", "default.rgw.control", "default.rgw.meta",
             "default.rgw.buckets.index", "default.rgw.buckets.data", "default.rgw.buckets.non-ec")
# Stop order: radosgw hangs on SIGTERM once the OSD is gone, and the OSD
# waits for the mon to acknowledge its going down.
STOP_ORDER = ("rgw", "osd", "mon")


class CephError(Exception):
    """The cluster did not start, or a command against it failed (the message says which and why)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_text(fsid: str, mon_port: int, directory: Path, memstore_bytes: int, rgw_port: int | None) -> str:
    """ceph.conf for a one-node cluster whose every file lives in `directory`."""
    d = directory
    text = f"""\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
keyring = /dev/null
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
mon data = {d}/mon-$id
osd data = {d}/osd-$id
# One copy of everything, placement across OSDs (not hosts), no mgr to
# scale placement groups.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
# Every pool or snapshot change waits for the next paxos round (1 s by default).
paxos propose interval = 0.05

[osd]
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
# A client killed with -9 keeps an image's exclusive lock until its watch
# times out (30 s by default): the next client waits that long for it (2 s here).
osd client watch timeout = 2
# memstore calls itself a spinning disk, whose snapshot trims sleep 5 s
# each: under many snapshots its memory filled before they were trimmed.
osd snap trim sleep hdd = 0

[client]
# A client (rbd, ceph, librados in a test) leaves no socket or log behind.
admin socket =
log file =
# A live client pings its watches every objecter tick (5 s by default),
# longer than the OSDs' 2 s watch timeout above: every watch was dropped 2 s
# after its ping and made again under a new cookie, and for that moment an
# image's lock owner looked dead. A client asking for the lock then broke it
# and blocklisted the owner's whole connection (about once in 900 backups of
# a daemon's repository against another client's writes: its next backup
# failed with "RBD connection was shutdown"). Pinging well within the
# timeout keeps live watches up; a killed client's still times out in 2 s.
objecter tick interval = 0.5
"""
    if rgw_port is not None:
        text += f"""
[client.rgw.a]
# tcp_nodelay: without it each small GET, listing or delete waited 40-48 ms
# (Nagle's algorithm on radosgw's side against the client's delayed ACK;
# 3.7-5 ms with it), what a well-set radosgw does.
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
log file = {d}/log/$name.log
# With auth none radosgw loops on get_initial_auth_request -13 without this.
ms mon client mode = crc
"""
    return text


def dead_conf(directory: Path | str) -> Path:
    """Write `directory`/ceph.conf naming a mon on a local port nothing listens on.

    For tests of an unreachable cluster: a client given it must fail with a
    clear error in bounded time (with its timeouts set small), not hang.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "ceph.conf"
    conf.write_text(f"""\
[global]
fsid = {uuid.uuid4()}
mon host = v2:127.0.0.1:{free_port()}
auth cluster required = none
auth service required = none
auth client required = none
keyring = /dev/null
admin socket =
log file =
""")
    return conf


@dataclass(frozen=True)
class RbdImage:
    """An RBD image in the test cluster: its pool, namespace ("" for none), name and size."""

    pool: str
    namespace: str
    name: str
    size: int

    @property
    def spec(self) -> str:
        """POOL/IMAGE or POOL/NAMESPACE/IMAGE, as the rbd CLI names it."""
        return "/".join(p for p in (self.pool, self.namespace, self.name) if p)

    @property
    def source(self) -> str:
        """The image as a backupfs source: rbd:SPEC."""
        return f"rbd:{self.spec}"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies.

    A test session killed hard would otherwise leave daemons holding RAM
    (memstore) for good; the cluster is throwaway, so a kill loses nothing.
    Linux ties this to the starting *thread*: start() belongs in the main
    thread (pytest's fixtures run there), not in a worker thread that ends.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class _Daemon:
    """One daemon this cluster started: its name, a pidfd that stays valid
    (so no reused pid is ever signalled), and its Popen when it is our child."""

    def __init__(self, name: str, pid: int, pidfd: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.name = name
        self.pid = pid
        self.pidfd = pidfd
        self.popen = popen

    def exited(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to exit (the pidfd becomes readable)."""
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def signal(self, sig: int) -> None:
        """Send `sig` through the pidfd (a no-op once the process has exited)."""
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        """Collect our child's exit status, so it does not linger as a zombie."""
        if self.popen is not None:
            self.popen.wait()


class CephCluster:
    """A one-node cluster in `directory`: start() it, use it, stop() it.

    `memstore_bytes` caps the OSD's data, which lives in RAM. With `rgw`,
    radosgw serves S3 on `endpoint` with a user whose keys are
    `access_key`/`secret_key`. With `detach`, the daemons outlive this
    process (for the shell script); otherwise they die with it.
    """

    def __init__(self, directory: Path | str, *, rgw: bool = False, memstore_bytes: int = 4 << 30,
                 detach: bool = False) -> None:
        self.directory = Path(directory).absolute()
        self.rgw_enabled = rgw
        self.memstore_bytes = memstore_bytes
        self.detach = detach
        self.mon_port = 0
        self.rgw_port = 0
        self.access_key = ""
        self.secret_key = ""
        self._daemons: dict[str, _Daemon] = {}
        # Whether daemons.json is this object's to remove once its daemons are stopped.
        self._owns_record = False

    # ---- what tests use -------------------------------------------------

    @property
    def conf(self) -> Path:
        """The cluster's ceph.conf (what --ceph-conf or CEPH_CONF names)."""
        return self.directory / "ceph.conf"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with CEPH_CONF naming the cluster, for subprocesses."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    @property
    def mon_addr(self) -> str:
        """The mon's address as ceph.conf gives it (v2:127.0.0.1:PORT)."""
        return f"v2:127.0.0.1:{self.mon_port}"

    @property
    def endpoint(self) -> str:
        """radosgw's S3 endpoint URL (only with rgw=True)."""
        if not self.rgw_enabled:
            raise CephError("this cluster was started without radosgw")
        return f"http://127.0.0.1:{self.rgw_port}"

    @property
    def pids(self) -> dict[str, int]:
        """The pid of each daemon this cluster started (or attached), by name (mon, osd, rgw)."""
        return {name: d.pid for name, d in self._daemons.items()}

    def rbd(self, *args: str, input: bytes | None = None) -> str:
        """Run the rbd CLI against this cluster; its stdout, or CephError with its stderr."""
        return self._run(["rbd", "-c", str(self.conf), *args], COMMAND_SECONDS, input=input)

    def ceph(self, *args: str, input: bytes | None = None) -> str:
        """Run the ceph CLI against this cluster; its stdout, or CephError with its stderr."""
        return self._run(["ceph", "-c", str(self.conf), *args], COMMAND_SECONDS, input=input)

    def create_image(self, size: int, pool: str = "rbd", namespace: str = "", name: str = "") -> RbdImage:
        """A new image of `size` bytes (a unique name unless one is given)."""
        image = RbdImage(pool, namespace, name or f"img-{uuid.uuid4().hex[:12]}", size)
        self.rbd("create", "--size", f"{size}B", image.spec)
        return image

    def remove_image(self, image: RbdImage) -> None:
        """Remove `image` and every snapshot of it."""
        self.rbd("snap", "purge", "--no-progress", image.spec)
        self.rbd("rm", "--no-progress", image.spec)

    # ---- start ----------------------------------------------------------

    def start(self) -> CephCluster:
        """Start mon, OSD (and radosgw), make the pools; return when RBD is usable.

        Raises CephError, with the tails of the daemons' logs, when that does
        not happen within START_SECONDS; what was started is stopped again.
        """
        running = CephCluster.attach(self.directory)
        busy = bool(running.pids)
        running.release()
        if self._daemons or busy:
            raise CephError(f"a cluster already runs in {self.directory} (stop it first)")
        deadline = time.monotonic() + START_SECONDS
        try:
            self._start(deadline)
        except BaseException as e:
            tails = self._log_tails()
            self.stop()
            if isinstance(e, CephError):
                raise CephError(f"the cluster in {self.directory} did not start: {e}\n{tails}") from None
            raise
        return self

    def _start(self, deadline: float) -> None:
        d = self.directory
        # A directory used before starts afresh: the old mon store names another fsid.
        for sub in ("run", "log", "mon-a", "osd-0", "rgw"):
            shutil.rmtree(d / sub, ignore_errors=True)
            (d / sub).mkdir(parents=True)
        self.mon_port = free_port()
        self.rgw_port = free_port() if self.rgw_enabled else 0
        fsid = str(uuid.uuid4())
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(_conf_text(fsid, self.mon_port, d, self.memstore_bytes,
                                  self.rgw_port if self.rgw_enabled else None))
        tmp.replace(self.conf)
        c = ["-c", str(self.conf)]

        self._run(["monmaptool", "--create", "--clobber", "--fsid", fsid,
                   "--addv", "a", f"[{self.mon_addr}]", str(d / "monmap")], self._left(deadline))
        self._run(["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
                   "--keyring", "/dev/null"], self._left(deadline))
        self._spawn("mon", ["ceph-mon", *c, "-f", "-i", "a"])

        osd_uuid = str(uuid.uuid4())
        osd_id = self._run(["ceph", *c, "osd", "new", osd_uuid], self._left(deadline)).strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new gave id {osd_id!r}, expected 0")
        self._run(["ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], self._left(deadline))
        self._spawn("osd", ["ceph-osd", *c, "-f", "-i", "0"])

        # All pools from one ceph process (each separate one pays its start-up);
        # it reports no failing command, so what it made is checked below.
        pools = ["rbd", SECOND_POOL, *(RGW_POOLS if self.rgw_enabled else ())]
        script = "".join(f"osd pool create {p}\n" for p in pools)
        script += "".join(f"osd pool application enable {p} rgw\n" for p in pools if p not in ("rbd", SECOND_POOL))
        self._run(["ceph", *c], self._left(deadline), input=script.encode())
        made = set(self._run(["ceph", *c, "osd", "pool", "ls"], self._left(deadline)).split())
        if set(pools) - made:
            raise CephError(f"pools not created: {', '.join(sorted(set(pools) - made))}")
        # `rbd pool init` writes to the pool: it returns once the OSD is up
        # and the pool's placement groups are active (the readiness condition).
        for pool in ("rbd", SECOND_POOL):
            self._run(["rbd", *c, "pool", "init", pool], self._left(deadline))
        self._run(["rbd", *c, "namespace", "create", f"rbd/{NAMESPACE}"], self._left(deadline))
        stat = json.loads(self._run(["ceph", *c, "osd", "stat", "--format", "json"], self._left(deadline)))
        if stat.get("num_up_osds") != 1:
            raise CephError(f"the OSD is not up: {stat}")

        if self.rgw_enabled:
            self.access_key = secrets.token_hex(10).upper()
            self.secret_key = secrets.token_hex(20)
            self._spawn("rgw", ["radosgw", *c, "-f", "-n", "client.rgw.a"])
            self._run(["radosgw-admin", *c, "user", "create", "--uid=test", "--display-name=test",
                       f"--access-key={self.access_key}", f"--secret-key={self.secret_key}"],
                      self._left(deadline))
            self._wait_http(self.endpoint, deadline)
        self._record()

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start one daemon in the foreground (-f), its output in log/NAME.out."""
        with open(self.directory / "log" / f"{name}.out", "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True,
                                 preexec_fn=None if self.detach else _die_with_parent)
        self._daemons[name] = _Daemon(name, p.pid, os.pidfd_open(p.pid), p)
        self._record()

    def _wait_http(self, url: str, deadline: float) -> None:
        """Wait until radosgw answers HTTP (any status: it serves), or the deadline."""
        while True:
            dead = [d.name for d in self._daemons.values() if d.exited(0)]
            if dead:
                raise CephError(f"{', '.join(dead)} exited while waiting for {url}")
            try:
                urllib.request.urlopen(url, timeout=max(0.1, deadline - time.monotonic())).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise CephError(f"radosgw did not answer on {url}: {e}") from None
                # Connection refused: it has not bound its port yet. Wait for
                # its log to grow or its exit, not a fixed time.
                self._daemons["rgw"].exited(0.05)

    @staticmethod
    def _left(deadline: float) -> float:
        """Seconds left before `deadline` (CephError once none are)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise CephError(f"not ready within {START_SECONDS:g} s")
        return left

    def _run(self, argv: list[str], timeout: float, input: bytes | None = None) -> str:
        """Run a command; its stdout, or CephError naming it with its stderr.

        Waits for the command, the deadline, or a daemon's death, whichever
        comes first: a client of a dead mon would otherwise retry until its
        own timeout (five minutes).
        """
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                 stdout=out, stderr=err, env=self.env)
            try:
                if input is not None:
                    assert p.stdin is not None
                    p.stdin.write(input)
                    p.stdin.close()
                fd = os.pidfd_open(p.pid)
                try:
                    poll = select.poll()
                    poll.register(fd, select.POLLIN)
                    for d in self._daemons.values():
                        poll.register(d.pidfd, select.POLLIN)
                    ready = {f for f, _ in poll.poll(int(timeout * 1000))}
                finally:
                    os.close(fd)
                if fd not in ready:
                    dead = [d.name for d in self._daemons.values() if d.pidfd in ready]
                    why = f"{', '.join(dead)} exited" if dead else f"no answer within {timeout:.1f} s"
                    raise CephError(f"`{' '.join(argv)}` failed: {why}")
            finally:
                if p.poll() is None:
                    p.kill()
                p.wait()
            out.seek(0)
            err.seek(0)
            if p.returncode != 0:
                message = err.read().decode(errors="replace").strip() or out.read().decode(errors="replace").strip()
                raise CephError(f"`{' '.join(argv)}` exited {p.returncode}: {message}")
            return out.read().decode()

    def _record(self) -> None:
        """Write daemons.json (pids and radosgw's keys), whole, for `stop DIR` and by-hand use."""
        info = {"conf": str(self.conf), "pids": self.pids, "mon_addr": self.mon_addr}
        if self.rgw_enabled:
            info.update(endpoint=self.endpoint, access_key=self.access_key, secret_key=self.secret_key)
        tmp = self.directory / "daemons.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(self.directory / "daemons.json")
        self._owns_record = True

    def _log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log and output file, for a failed start."""
        parts = []
        for f in sorted((self.directory / "log").glob("*")):
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"--- {f.name}:\n" + "\n".join(tail))
        return "\n".join(parts)

    # ---- stop -----------------------------------------------------------

    def stop(self) -> None:
        """Stop radosgw, then the OSD, then the mon: SIGTERM, SIGKILL after
        TERM_SECONDS, each waited for. Safe to call twice or after a failed start.

        Raises CephError if a daemon outlives SIGKILL by KILL_SECONDS.
        """
        stubborn = []
        for name in STOP_ORDER:
            d = self._daemons.get(name)
            if d is None:
                continue
            d.signal(signal.SIGTERM)
            if not d.exited(TERM_SECONDS):
                d.signal(signal.SIGKILL)
                if not d.exited(KILL_SECONDS):
                    stubborn.append(f"{name} (pid {d.pid})")
                    continue
            d.reap()
            os.close(d.pidfd)
            del self._daemons[name]
        if self._owns_record and not self._daemons:
            (self.directory / "daemons.json").unlink(missing_ok=True)
            self._owns_record = False
        if stubborn:
            raise CephError(f"{', '.join(stubborn)} did not exit after SIGKILL")

    def release(self) -> None:
        """Forget the daemons without stopping them (closes their pidfds)."""
        for d in self._daemons.values():
            os.close(d.pidfd)
        self._daemons.clear()
        self._owns_record = False

    @classmethod
    def attach(cls, directory: Path | str) -> CephCluster:
        """The cluster that `start DIR` left running in `directory`, to stop it from another process.

        Only a recorded pid whose process still runs with this directory's
        ceph.conf on its command line is taken (a pid reused by an unrelated
        process is left alone); the pidfd taken first pins that process.
        """
        c = cls(directory)
        try:
            info = json.loads((c.directory / "daemons.json").read_text())
        except FileNotFoundError:
            return c  # nothing running: stop() has nothing to do
        c._owns_record = True
        c.mon_port = int(info["mon_addr"].rsplit(":", 1)[1])
        for name, pid in info["pids"].items():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                cmdline = []
            if os.fsencode(c.conf) in cmdline:
                c._daemons[name] = _Daemon(name, pid, fd, None)
            else:
                os.close(fd)
        return c


def main(argv: list[str] | None = None) -> int:
    """`start DIR [--rgw]` prints the conf path (and radosgw's endpoint and keys) once ready; `stop DIR`."""
    parser = argparse.ArgumentParser(prog="ceph-test-cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a throwaway cluster in DIR; print its ceph.conf once ready")
    start.add_argument("dir", type=Path)
    start.add_argument("--rgw", action="store_true", help="also start radosgw (S3) with a user")
    start.add_argument("--memstore-gib", type=int, default=4, help="cap on the OSD's data, in RAM (default 4)")
    stop = sub.add_parser("stop", help="stop the cluster that start left in DIR")
    stop.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            c = CephCluster(args.dir, rgw=args.rgw, memstore_bytes=args.memstore_gib << 30, detach=True).start()
            print(c.conf)
            if args.rgw:
                print(f"endpoint {c.endpoint}\naccess_key {c.access_key}\nsecret_key {c.secret_key}")
        else:
            CephCluster.attach(args.dir).stop()
    except CephError as e:
        print(f"ceph-test-cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
