"""Review of the device relay (backupfs/_relay.c, engine/_devio.c): reproductions.

Each test here failed on the branch as reviewed; see the docstrings.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.mounts import mounted_device

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64 << 20


# A stand-in for the kernel: the relay is started on one end of a SEQPACKET
# socket pair, so the test plays /dev/fuse (requests in, replies out) and
# pyfuse3 (the number the relay hands back).
HARNESS = textwrap.dedent("""
    import os, socket, struct, sys, tempfile, threading, time
    from bitarray import bitarray
    import engine._devio
    from engine._devio import DevIO
    from backupfs._relay import Relay

    IN_HDR = struct.Struct("<IIQQIIII")   # fuse_in_header (40)
    READ_IN = struct.Struct("<QQIIQII")   # fuse_read_in (40)

    def read_req(unique, fh, off, size):
        body = READ_IN.pack(fh, off, size, 0, 0, 0, 0)
        return IN_HDR.pack(IN_HDR.size + len(body), 15, unique, 2, 0, 0, 0, 0) + body

    kern, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (kern, dev):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    size = 64 << 20
    fd = os.open(os.path.join(sys.argv[1], "src.img"), os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"x" * size, 0)
    d = DevIO(fd, size, 65536, 0)
    bm = [bitarray(size // 65536, endian="little") for _ in range(2)]
    d.set_bitmaps(*bm)
    d.unblock()
    relay = Relay()
    relay.start(dev.fileno(), 4, 64)
    relay.register(1, d)
""")


def run_harness(tmp_path: Path, body: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-X", "faulthandler", str(script), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_concurrent_registers_while_requests_are_in_c_keep_every_handle(tmp_path: Path) -> None:
    """Relay_register reads count/cap and copies the table before it takes the
    table lock (with the GIL released while it waits for the lock). Two opens
    registering at once while a request is in C (the lock held shared) both
    see the same count: one entry is lost or written past the table's end
    (heap overflow), and a grown table copied from a stale one leaves garbage
    entries that stop() / dealloc Py_DECREF: the daemon segfaults."""
    proc = run_harness(tmp_path, """
        stop = threading.Event()
        def kernel_send():
            u = 2
            while not stop.is_set():
                kern.send(read_req(u, 1, (u % 60) << 20, 1 << 20))
                u += 2
        def kernel_recv():
            while not stop.is_set():
                try:
                    kern.recv(2 << 20)
                except OSError:
                    break
        for t in (kernel_send, kernel_recv):
            threading.Thread(target=t, daemon=True).start()
        time.sleep(0.2)
        lost, nxt = 0, 100
        for _ in range(20):
            fhs = list(range(nxt, nxt + 16))
            nxt += 16
            regs = [threading.Thread(target=relay.register, args=(fh, d)) for fh in fhs]
            for t in regs:
                t.start()
            for t in regs:
                t.join()
            lost += sum(not relay.unregister(fh) for fh in fhs)
        stop.set()
        print("lost", lost, flush=True)
        relay.stop()
        print("stopped", flush=True)
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "lost 0" in proc.stdout and "stopped" in proc.stdout, proc.stdout


def _mounts_at(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        return [line.split(" - ")[1].split()[0] for line in f if line.split()[4] == str(path)]


@pytest.mark.mount
def test_a_daemon_whose_connection_ended_does_not_unmount_what_is_mounted_there_now(tmp_path: Path) -> None:
    """pyfuse3.close(unmount=True) polls its descriptor for POLLERR (the
    connection is gone: nothing to unmount) before it unmounts. With the
    relay that descriptor is a socket, never POLLERR, so a daemon whose
    mount ended from outside still calls umount2(MOUNT, MNT_DETACH): it
    detaches whatever is mounted at that path by then. Lazy unmount while a
    VM holds the device open, a new mount there, the VM closes: the new
    mount is gone."""
    from backupfs.mountinfo import wait_for_exit

    with mounted_device(tmp_path, bytes(16 << 20)) as m:
        fd = os.open(m.path("vm1", "device"), os.O_RDWR)
        pid = m.pid
        assert pid is not None
        try:
            subprocess.run(["umount", "-l", str(m.mnt)], check=True, timeout=60)
            subprocess.run(["mount", "-t", "tmpfs", "newcomer", str(m.mnt)], check=True, timeout=60)
        finally:
            os.close(fd)  # the connection ends now: the old daemon stops
        try:
            wait_for_exit(pid, 60)
            m.pid = None
            time.sleep(0.5)
            assert _mounts_at(m.mnt) == ["tmpfs"], _mounts_at(m.mnt)
        finally:
            while _mounts_at(m.mnt):
                subprocess.run(["umount", "-l", str(m.mnt)], timeout=60)


def test_the_relay_module_imports_on_its_own() -> None:
    """PyInit__relay calls PyCapsule_Import("engine._devio._C_API"), which
    imports only "engine" and then looks up its attribute _devio: unless
    engine._devio was imported before, that raises AttributeError, which
    relay.py's ``except ImportError`` does not catch (the fallback is
    bypassed; whoever imports backupfs.relay first crashes)."""
    proc = subprocess.run([sys.executable, "-c", "import backupfs.relay as r; print(r.Relay is not None)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.mount
@pytest.mark.long
def test_large_direct_io_during_a_job_goes_through_the_socket_whole(tmp_path: Path) -> None:
    """During a job every device write is declined by C and passed to pyfuse3
    through the SEQPACKET socket: 1 MiB O_DIRECT writes (several at once) must
    land whole, and 1 MiB reads of a backup (replies through the socket) too."""
    from tests.commands import sh
    from tests.test_fuse_mount import backups, status

    rng = __import__("random").Random(7)
    data = rng.randbytes(SIZE)
    with mounted_device(tmp_path, data) as m:
        dev = m.path("vm1", "device")
        assert sh(f"echo full > {m.path('vm1', 'snapshot')}").returncode == 0
        first = m.path("vm1", "backups", backups(m)[0])
        job = subprocess.Popen(["bash", "-c", f"echo 'incremental rate=4M scan=1' > {m.path('vm1', 'snapshot')}"],
                               stderr=subprocess.PIPE, text=True)
        try:
            st = status(m)
            while st.get("state") != "running" or "bytes" not in st:
                assert job.poll() is None, "the job ended before it was seen copying"
                st = status(m)
            new = rng.randbytes(8 << 20)
            (tmp_path / "new").write_bytes(new)
            writers = [subprocess.Popen(["dd", f"if={tmp_path / 'new'}", f"of={dev}", "bs=1M", "count=2",
                                         f"skip={2 * k}", f"seek={10 + 2 * k}", "oflag=direct", "iflag=fullblock",
                                         "conv=notrunc", "status=none"]) for k in range(4)]
            readers = [subprocess.run(["dd", f"if={first}", "bs=1M", "iflag=direct", "status=none"],
                                      capture_output=True, timeout=120) for _ in range(2)]
            assert all(p.wait(120) == 0 for p in writers)
            assert job.poll() is None, "the job finished before the writes; the test proved nothing"
        finally:
            job.wait(timeout=300)
        assert job.returncode == 0, job.stderr
        for r in readers:
            assert r.returncode == 0 and r.stdout == data, (r.returncode, len(r.stdout))
        expected = bytearray(data)
        expected[10 << 20 : 18 << 20] = new
        assert dev.read_bytes() == bytes(expected)
        assert m.path("vm1", "backups", "latest").read_bytes() == data  # the trigger-time device


def test_a_relay_that_cannot_start_its_threads_leaves_pyfuse3_its_device(tmp_path: Path) -> None:
    """Relay.start puts the socket at pyfuse3's descriptor (dup3) before it
    creates its threads; if none can be created (here: the forwarder's stack
    cannot be mapped) it raises OSError, which start_relay takes for "cannot
    start: pyfuse3 serves everything as before". But pyfuse3's number is the
    socket by then and nothing relays: every request of the mount goes
    unanswered (the mount hangs), and the device descriptor leaks."""
    script = tmp_path / "nothreads.py"
    script.write_text(textwrap.dedent("""
        import os, resource, socket
        import engine._devio
        from backupfs._relay import Relay
        kern, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # kern plays /dev/fuse
        session = dev.fileno()
        before = os.fstat(session).st_ino
        relay = Relay()
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 20), hard))
        try:
            relay.start(session, 4, 64)
            started = True
        except OSError:
            started = False
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if not started:  # the fallback: pyfuse3 must still read the device itself
            assert os.fstat(session).st_ino == before, "pyfuse3's descriptor is the relay's socket now"
            kern.send(b"a request")
            dev.settimeout(2)
            assert dev.recv(100) == b"a request"
        print("ok")
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]



@pytest.mark.mount
def test_sigterm_while_a_vm_writes_in_c_ends_the_daemon_and_keeps_the_marks(tmp_path: Path) -> None:
    """(Sound.) SIGTERM with writes running in the relay's threads: the daemon
    exits, the writer gets errors rather than hanging, and every write that
    was acknowledged is in the saved bitmap."""
    import json
    import signal

    from backupfs.mountinfo import wait_for_exit
    with mounted_device(tmp_path, bytes(SIZE)) as m:
        (m.path("vm1", "snapshot")).write_text("full\n")
        device = str(m.path("vm1", "device"))
        acked: list[int] = []

        def writer() -> None:
            buf = mmap.mmap(-1, 4096)
            buf.write(b"w" * 4096)
            try:
                fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                return
            try:
                k = 0
                while True:
                    off = ((k * 7919) % (SIZE // 65536)) * 65536
                    os.pwritev(fd, [buf], off)
                    acked.append(off)
                    k += 1
            except OSError:
                pass
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass  # ENOTCONN: the daemon is gone

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert m.pid is not None
        pid = m.pid
        os.kill(pid, signal.SIGTERM)
        wait_for_exit(pid, 60)
        m.pid = None
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a writer hung after the daemon ended"
        assert acked
    log = m.log()
    assert "bitmaps saved" in log, log[-2000:]
    from engine.bitmap import load_bitmap
    from engine.layout import device_dir

    for which in ("since-last", "since-full"):
        stored = load_bitmap(os.path.join(device_dir(str(m.repo), "vm1"), f"{which}.bitmap"))
        assert stored.trusted and not stored.in_use
        missing = sorted({off for off in acked if not stored.bitmap.is_dirty(off, 4096)})
        assert not missing, (which, missing[:10])


@pytest.mark.mount
@pytest.mark.long
def test_incrementals_under_c_writers_are_points_in_time(tmp_path: Path) -> None:
    """(Sound.) Four O_DIRECT writers (served in C until the trigger, then by
    copy-before-write) run through three incrementals. Each slot's content
    names its (writer, slot, sequence); a backup is a point in time if some
    instant T lies after every stored version was issued and before the
    next version of any slot was acknowledged."""
    import struct

    slots = 16
    region = 4 << 20

    with mounted_device(tmp_path, bytes(SIZE)) as m:
        (m.path("vm1", "snapshot")).write_text("full\n")
        device = str(m.path("vm1", "device"))
        stop = threading.Event()
        # (writer, slot) -> list of (seq, issued, acked)
        history: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
        lock = threading.Lock()

        def writer(w: int) -> None:
            buf = mmap.mmap(-1, 4096)
            fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
            try:
                seq = 0
                while not stop.is_set():
                    seq += 1
                    for s in range(slots):
                        buf.seek(0)
                        buf.write(struct.pack("<III", w, s, seq) * (4096 // 12) + bytes(4096 % 12))
                        issued = time.monotonic()
                        os.pwritev(fd, [buf], w * region + s * 65536)
                        acked = time.monotonic()
                        with lock:
                            history.setdefault((w, s), []).append((seq, issued, acked))
            finally:
                os.close(fd)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(3):
                time.sleep(0.7)
                (m.path("vm1", "snapshot")).write_text("incremental\n")
                latest = m.path("vm1", "backups", os.readlink(m.path("vm1", "backups", "latest")))
                with open(latest, "rb") as f:
                    stored = {}
                    for w in range(4):
                        for s in range(slots):
                            f.seek(w * region + s * 65536)
                            ww, ss, seq = struct.unpack("<III", f.read(12))
                            assert (ww, ss) in ((w, s), (0, 0)), (w, s, ww, ss)
                            stored[(w, s)] = seq if (ww, ss) == (w, s) else 0
                with lock:
                    snap = {k: list(v) for k, v in history.items()}
                latest_issue = 0.0
                earliest_next_ack = float("inf")
                for key, seq in stored.items():
                    versions = {v[0]: v for v in snap.get(key, [])}
                    if seq:
                        latest_issue = max(latest_issue, versions[seq][1])
                    if seq + 1 in versions:
                        earliest_next_ack = min(earliest_next_ack, versions[seq + 1][2])
                    else:
                        # No later version acknowledged yet (its writer was slow): the
                        # stored one must then be the newest acknowledged, if any.
                        newest = max(versions, default=0)
                        assert seq == newest, f"slot {key} stored seq {seq}, newest acknowledged {newest}"
                assert latest_issue < earliest_next_ack, (latest_issue, earliest_next_ack)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    served = int(__import__("re").findall(r"relay: (\d+) device requests served in C", m.log())[-1])
    assert served > 100, served
