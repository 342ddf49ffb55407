"""Stopping a backup: Ctrl-C, kill, kill -9 and timeout on whoever waits for it.

The trigger's write() returns only when the backup is done, and the kernel
waits for a FUSE answer uninterruptibly once a fatal signal is pending: before
the mount watched the writer's signals, `kill -9` of `echo full > snapshot`
left it in state D until the copy ended. Each test here fails that way on
the old code (the writer's wait times out).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backupfs.mountinfo import wait_for_exit
from backupfs.requester import Requester, stopping_signal
from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted, mounted_device
from engine.job import CancelRequest, JobCancelled
from engine.repo import Repository

MiB = 1024 * 1024
# A cancelled writer must be let go at once; the jobs below would run 32 s.
LET_GO = 10


def sigint_at_its_default() -> None:
    """A child's preexec_fn: SIGINT as a terminal's Ctrl-C finds it. A run of
    the tests started with `&` from a script ignores SIGINT (bash does that
    to a script's background jobs), and the commands it starts inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

# `backupfs ARGS` as the console script runs it, with PAUSE (Python run
# first) holding it at a chosen point: pause() tells the test through a pipe
# and waits until the test closes the command's stdin. A signal sent while it
# waits there lands at that point, however slow or loaded the machine; a
# signal sent on seeing a file appear could land after the work was done.
_PAUSED_CLI = """
import os, sys
def pause():
    os.write({fd}, b"paused\\n")
    os.close({fd})
    sys.stdin.read()
{pause}
from backupfs.cli import main
sys.exit(main({args!r}))
"""


@contextlib.contextmanager
def paused_cli(args: list[str], pause: str, **popen: object) -> Iterator[subprocess.Popen]:
    """The command, started and waiting at its pause() (stdin and the
    outputs are pipes: communicate() closes stdin, which lets it go on);
    SIGINT at its default unless ``popen`` says otherwise."""
    popen.setdefault("preexec_fn", sigint_at_its_default)
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSED_CLI.format(fd=w, pause=pause, args=args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                pass_fds=[w], cwd=Path(__file__).parent.parent,
                                **popen)  # type: ignore[call-overload]
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as paused:
            assert paused.readline() == b"paused\n", proc.communicate(timeout=120)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=120)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounted]:
    """A 64 MiB device of random data with a full backup, mounted."""
    with mounted_device(tmp_path, os.urandom(64 * MiB)) as m:
        sh(f"echo full > {m.path('vm1', 'snapshot')}")
        yield m


def status(m: Mounted) -> dict[str, str]:
    fields = {}
    for line in m.path("vm1", "snapshot").read_text().splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def backups(m: Mounted) -> list[str]:
    return sorted(p for p in os.listdir(m.path("vm1", "backups")) if p != "latest")


def wait_running(m: Mounted, proc: subprocess.Popen, pid: int) -> dict[str, str]:
    """Until the status shows the job copying at the request of ``pid``."""
    while True:
        st = status(m)
        if st.get("state") == "running" and "bytes" in st and f"pid {pid} " in st.get("requested by", ""):
            return st
        assert proc.poll() is None, f"the job ended before it was seen running: {st}"


def leftovers(m: Mounted) -> list[str]:
    return [f for f in os.listdir(m.repo / "devices" / "vm1") if f.startswith(".tmp")]


def dirty_32m(m: Mounted) -> None:
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=1M count=32 seek=8 conv=notrunc status=none")


@pytest.mark.mount
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_killing_the_writer_cancels_the_backup(mounted: Mounted, tmp_path: Path, sig: signal.Signals) -> None:
    """The writer is let go with its signal; no backup, no leftovers, the
    bitmap kept: the next incremental holds every change."""
    m = mounted
    before = backups(m)
    dirty_32m(m)
    # 32 MiB at 1 MiB/s: the job would hold the writer for 32 s. A script
    # (not an interactive shell) would ignore SIGINT if started with `&`;
    # here it is at its default, as a terminal's Ctrl-C finds it.
    job = subprocess.Popen(["bash", "-c", f"echo 'incremental rate=1M' > {m.path('vm1', 'snapshot')}"],
                           stderr=subprocess.PIPE, text=True, restore_signals=True,
                           preexec_fn=sigint_at_its_default)
    try:
        wait_running(m, job, job.pid)
        job.send_signal(sig)
        job.wait(timeout=LET_GO)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=120)
    assert job.returncode == -sig
    st = status(m)
    assert st["state"] == "cancelled", st
    assert st["cancelled"] == f"pid {job.pid} (bash) received {sig.name}; no backup was made"
    assert st["bitmap"].startswith("kept")
    assert backups(m) == before and leftovers(m) == []
    # The daemon's job history says so too.
    with sqlite3.connect(f"file:{m.repo / 'catalog.db'}?mode=ro", uri=True) as db:
        state, error = db.execute("SELECT state, error FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
    assert state == "cancelled" and error == f"backup cancelled: pid {job.pid} (bash) received {sig.name}"
    # Nothing was lost: the next incremental copies the 32 MiB again.
    sh(f"echo incremental > {m.path('vm1', 'snapshot')}")
    assert int(status(m)["bytes stored"]) >= 32 * MiB
    sh(f"cmp {m.path('vm1', 'backups', 'latest')} {m.path('vm1', 'device')}")


@pytest.mark.mount
def test_timeout_of_a_backup_works(mounted: Mounted) -> None:
    """`timeout 2 sh -c 'echo ... > snapshot'` in cron: the shell is let go."""
    m = mounted
    dirty_32m(m)
    started = time.monotonic()
    proc = sh(f"timeout 2 sh -c \"echo 'incremental rate=1M' > {m.path('vm1', 'snapshot')}\"",
              check=False, timeout=LET_GO + 2)
    assert proc.returncode == 124  # timeout's "the command timed out"
    assert time.monotonic() - started < LET_GO
    assert status(m)["state"] == "cancelled"


@pytest.mark.mount
def test_ctrl_c_of_the_cli_cancels_the_backup_through_the_mount(mounted: Mounted) -> None:
    m = mounted
    dirty_32m(m)
    proc = subprocess.Popen(backupfs_cmd() + ["backup", str(m.repo), "vm1", "incremental", "--rate", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_at_its_default)
    try:
        wait_running(m, proc, proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LET_GO)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: the backup of vm1 was cancelled; no backup was made, bitmap kept" in err
    assert status(m)["cancelled"] == f"pid {proc.pid} (backupfs) received SIGINT; no backup was made"


@pytest.mark.mount
def test_a_harmless_signal_does_not_cancel(mounted: Mounted) -> None:
    """SIGCHLD from a shell's background job, or a signal the writer handles
    and does not stop for, must not cost a backup."""
    m = mounted
    dirty_32m(m)
    writer = (
        "import os, signal, sys\n"
        "seen = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))\n"
        f"fd = os.open({str(m.path('vm1', 'snapshot'))!r}, os.O_WRONLY)\n"
        "print(os.write(fd, b'incremental rate=8M\\n'), len(seen), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_running(m, proc, proc.pid)
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGCHLD)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["20", "1"]  # the whole line written, the handler ran after
    st = status(m)
    assert st["state"] == "succeeded" and int(st["bytes stored"]) >= 32 * MiB


def test_direct_backup_interrupted_is_recorded_as_cancelled(tmp_path: Path) -> None:
    """Not mounted: Ctrl-C of `backupfs backup` leaves a 'cancelled' job, no
    backup, no temporary image, and the repository unlocked."""
    src = tmp_path / "vm1.img"
    src.write_bytes(os.urandom(32 * MiB))
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    proc = subprocess.Popen(backupfs_cmd() + ["backup", str(repo), "vm1", "full", "--rate", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_at_its_default)
    try:
        while True:  # until the job is in the history and copying
            with sqlite3.connect(f"file:{repo / 'catalog.db'}?mode=ro", uri=True) as db:
                row = db.execute("SELECT state FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
            if row is not None and row[0] == "running":
                break
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LET_GO)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    listing = cli("status", repo).stdout.decode()
    assert " full " in listing and "cancelled: interrupted" in listing, listing
    assert cli("list", repo).stdout.decode().strip().splitlines()[1:] == []  # the header only
    assert [f for f in os.listdir(repo / "devices" / "vm1") if f.startswith(".tmp")] == []


# -- the pieces, without a mount ------------------------------------------------------------


def _status(pnd: int = 0, shd: int = 0, blk: int = 0, cgt: int = 0) -> str:
    return (f"Name:\tsh\nSigQ:\t0/1\nSigPnd:\t{pnd:016x}\nShdPnd:\t{shd:016x}\nSigBlk:\t{blk:016x}\n"
            f"SigIgn:\t0000000000000000\nSigCgt:\t{cgt:016x}\n")


def bit(sig: int) -> int:
    return 1 << (sig - 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_status(), None),
        (_status(shd=bit(signal.SIGTERM)), signal.SIGTERM),
        (_status(pnd=bit(signal.SIGKILL), shd=bit(signal.SIGTERM)), signal.SIGTERM),  # name what was sent
        (_status(pnd=bit(signal.SIGKILL)), signal.SIGKILL),
        (_status(pnd=bit(signal.SIGINT)), signal.SIGINT),
        (_status(shd=bit(signal.SIGHUP)), signal.SIGHUP),
        (_status(shd=bit(signal.SIGCHLD) | bit(signal.SIGUSR1) | bit(signal.SIGWINCH)), None),
        (_status(shd=bit(signal.SIGTERM), blk=bit(signal.SIGTERM)), None),  # blocked: not yet
        # Ctrl-C stops a program that catches it (Python, shells); a caught
        # SIGTERM or SIGHUP is the program's business (a reload, a retry).
        (_status(shd=bit(signal.SIGINT), cgt=bit(signal.SIGINT)), signal.SIGINT),
        (_status(shd=bit(signal.SIGHUP), cgt=bit(signal.SIGHUP)), None),
        (_status(shd=bit(signal.SIGTERM), cgt=bit(signal.SIGTERM)), None),
        (_status(pnd=bit(signal.SIGKILL), shd=bit(signal.SIGTERM) | bit(signal.SIGHUP), cgt=bit(signal.SIGHUP)),
         signal.SIGTERM),
        ("SigPnd:\tzz\n", None),
        ("", None),
    ],
)
def test_stopping_signal(text: str, expected: int | None) -> None:
    assert stopping_signal(text) == expected


def test_requester_of_a_real_thread_with_a_blocked_then_pending_signal() -> None:
    """The parts of /proc we read, read off a live process: a blocked
    SIGTERM is pending but not a stop; a vanished process is nobody's."""
    code = (
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        who = Requester.of(proc.pid)
        assert who is not None and who.name.startswith("python") and who.describe() == f"pid {proc.pid} ({who.name})"
        assert who.stopping_signal() is None
        os.kill(proc.pid, signal.SIGTERM)
        with open(f"/proc/{proc.pid}/status") as f:
            text = f.read()
        assert stopping_signal(text) is None and "ShdPnd:\t0000000000004000" in text
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert who.stopping_signal() is None  # gone
    assert Requester.of(proc.pid) is None and Requester.of(0) is None


def test_verify_can_be_cancelled(tmp_path: Path) -> None:
    src = tmp_path / "vm1.img"
    src.write_bytes(os.urandom(32 * MiB))  # four 8 MiB verify reads
    repo_path = tmp_path / "repo"
    Repository.init(str(repo_path))
    with Repository.open(str(repo_path)) as repo:
        repo.add_device("vm1", str(src))
        repo.backup("vm1", "full")
        cancel = CancelRequest()
        reads = []

        def on_bytes(n: int) -> None:  # the operator gives up after the first read
            reads.append(n)
            cancel.cancel("an operator asked")

        with pytest.raises(JobCancelled, match="verify cancelled: an operator asked"):
            repo.verify("vm1", on_bytes=on_bytes, cancel=cancel)
        assert reads == [8 * MiB]
        assert repo.verify("vm1").ok  # and a verify not cancelled reads it all


@pytest.mark.mount
def test_umount_during_a_job_names_it_and_works_once_it_is_cancelled(mounted: Mounted) -> None:
    m = mounted
    dirty_32m(m)
    job = subprocess.Popen(["bash", "-c", f"echo 'incremental rate=1M' > {m.path('vm1', 'snapshot')}"])
    try:
        wait_running(m, job, job.pid)
        proc = cli("umount", m.mnt, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Device or resource busy" in err, err
        assert f"jobs are running (vm1: incremental copying" in err and f"requested by pid {job.pid} (bash)" in err
        job.terminate()
        job.wait(timeout=LET_GO)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=120)
    m.stop()


def test_cancel_waits_for_copy_before_write_before_closing_the_image(tmp_path: Path, monkeypatch) -> None:
    """A device write's copy-before-write into the job's image may still be
    under way when the job is cancelled. Closing the image before it ends
    let its pwrite land in whatever file reused the descriptor number (the
    review's repro put 8 MiB into an unrelated file). The hooks only widen
    that window: the write pauses inside its pwrite until the image closes,
    or two seconds pass."""
    import threading

    from engine import durable
    from engine.qcow2 import writer as writer_module

    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 * MiB))
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("d", str(src))
        dev = repo.device("d")
        job_thread: list[int] = []
        cbw_writing = threading.Event()
        closed = threading.Event()
        events: list[str] = []
        cancel = CancelRequest()
        writers: list[threading.Thread] = []

        def on_progress(p: object) -> None:  # between two chunks of the job's own copy
            if threading.get_ident() == job_thread[0] and getattr(p, "done") and not writers:
                w = threading.Thread(target=dev.write, args=(30 * MiB, os.urandom(4096)))
                writers.append(w)
                w.start()
                assert cbw_writing.wait(10)
                cancel.cancel("the test")

        real_pwrite = durable.fs.pwrite

        def pwrite(fd: int, data: bytes, off: int) -> int:
            if threading.get_ident() != job_thread[0] and not cbw_writing.is_set():
                cbw_writing.set()
                closed.wait(2)
                events.append("copy-before-write done")
            return real_pwrite(fd, data, off)

        real_abort = writer_module.Qcow2Writer.abort

        def abort(self: writer_module.Qcow2Writer) -> None:
            real_abort(self)
            events.append("image closed")
            closed.set()

        monkeypatch.setattr(durable.fs, "pwrite", pwrite)
        monkeypatch.setattr(writer_module.Qcow2Writer, "abort", abort)
        job_thread.append(threading.get_ident())
        with pytest.raises(JobCancelled):
            repo.backup("d", "full", cancel=cancel, on_progress=on_progress)
        writers[0].join(10)
        assert events == ["copy-before-write done", "image closed"]
        assert [f for f in os.listdir(tmp_path / "repo" / "devices" / "d") if f.startswith(".tmp")] == []
    finally:
        repo.close()


@pytest.mark.mount
def test_an_unmount_cancels_with_ecanceled_which_no_one_retries(mounted: Mounted) -> None:
    """SIGTERM to the daemon (systemctl stop) cancels the job; its writer
    gets ECANCELED. EINTR would make Python (and C retry loops) send the
    trigger line again, to a mount that is going away or to a new one."""
    m = mounted
    dirty_32m(m)
    writer = (
        "import errno, os\n"
        f"fd = os.open({str(m.path('vm1', 'snapshot'))!r}, os.O_WRONLY)\n"
        "try:\n"
        "    os.write(fd, b'incremental rate=1M\\n')\n"
        "    print('written')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_running(m, proc, proc.pid)
        assert m.pid is not None
        os.kill(m.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=120)
    assert out.strip() == "ECANCELED", (out, err)
    wait_for_exit(m.pid, 60)
    m.pid = None
    assert "cancelled: the mount daemon received SIGTERM and is unmounting" in m.log()


@pytest.mark.mount
def test_a_crash_then_a_full_disk_still_lists(tmp_path: Path) -> None:
    """A process died during a job (its WAL and a 'running' job left), then
    the disk filled: the catalog opens normally but cannot record that the
    job was interrupted. That used to be an internal error."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        src = tmp_path / "src.raw"
        src.write_bytes(os.urandom(2 * MiB))
        repo = small / "repo"
        cli("init", repo)
        cli("device", "add", repo, "vm1", src)
        cli("backup", repo, "vm1", "full")
        crash = ("import os, sys\n"
                 "from engine.repo import Repository\n"
                 f"r = Repository.open({str(repo)!r})\n"
                 "r.catalog.job_started('vm1', 'incremental')\n"
                 "os._exit(0)\n")
        subprocess.run([sys.executable, "-c", crash], check=True, cwd=Path(__file__).parent.parent)
        assert (repo / "catalog.db-wal").stat().st_size > 0
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass
        finally:
            os.close(fd)
        listing = cli("list", repo).stdout.decode().splitlines()
        assert len(listing) == 2 and listing[1].split("\t")[2] == "full"
        assert " incremental " in cli("status", repo).stdout.decode()
        proc = cli("backup", repo, "vm1", "incremental", check=False)
        assert proc.returncode == 1 and b"disk is full" in proc.stderr, proc.stderr
        (small / "filler").unlink()
        assert "interrupted: the process stopped while the job ran" in cli("status", repo).stdout.decode()
        cli("backup", repo, "vm1", "incremental")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _small_repo(tmp_path: Path) -> tuple[Repository, Path]:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    repo.add_device("d", str(src))
    return repo, src


def test_ctrl_c_right_after_the_commit_keeps_the_backup(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C landing after the catalog commit but before the job knew: the
    cleanup used to delete the files of a backup the catalog names (verify
    BAD, the next incremental failed)."""
    from engine import durable

    repo, src = _small_repo(tmp_path)
    try:
        repo.backup("d", "full")
        dev = repo.device("d")
        dev.write(MiB, os.urandom(64 * 1024))

        def interrupted(path: str) -> None:
            # After the commit that makes the backup visible (not the one
            # recording its files as in progress, before them).
            latest = repo.catalog.latest_backup("d")
            if latest is not None and latest.kind == "incremental":
                raise KeyboardInterrupt

        monkeypatch.setattr(durable.fs, "catalog_committed", interrupted)
        with pytest.raises(KeyboardInterrupt):
            repo.backup("d", "incremental")
        monkeypatch.undo()
        latest = repo.catalog.latest_backup("d")
        assert latest is not None and latest.kind == "incremental"
        assert (tmp_path / "repo" / latest.image).exists() and repo.verify("d").ok
        assert dev.since_last.active.dirty_bytes() == 0  # what it copied is not copied again
    finally:
        repo.close()


def test_ctrl_c_while_ending_a_job_does_not_hang_the_close(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C inside the job's ending (bitmaps handed over under the gate)
    left the job registered, and close() then waited for it forever while
    holding the repository's lock."""
    import threading

    repo, src = _small_repo(tmp_path)
    closed = threading.Event()
    try:
        repo.backup("d", "full")
        dev = repo.device("d")

        def interrupted() -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(dev.since_last, "abdicate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            repo.backup("d", "incremental", scan=True)
        monkeypatch.undo()
    finally:
        closer = threading.Thread(target=lambda: (repo.close(), closed.set()), daemon=True)
        closer.start()
        closer.join(30)
    assert closed.is_set(), "close() hung"


def test_a_stop_signal_as_the_job_is_registered_lands_where_it_is_undone(tmp_path: Path, monkeypatch) -> None:
    """A stop whose handler raises (the CLI's SIGHUP here) arriving as the
    setup leaves the device's gate, after the job was registered and before
    the try that undoes it: it left the job registered, and close() waited
    for it forever (a CI run's `backupfs backup` hung until killed). It is
    now held back until that try, and the backup is cleanly not made."""
    import threading

    class Stop(Exception):
        pass

    def raise_stop(signum: int, frame: object) -> None:
        raise Stop

    repo, src = _small_repo(tmp_path)
    closed = threading.Event()
    previous = signal.signal(signal.SIGHUP, raise_stop)
    try:
        repo.backup("d", "full")
        dev = repo.device("d")
        exclusive = dev.gate.exclusive

        @contextlib.contextmanager
        def signalled_on_exit() -> Iterator[None]:
            with exclusive():
                yield
                if dev.job is not None:  # the setup's gate, the job just registered
                    # To this (the main) thread: sent to the process, it may go to
                    # one of the test runner's threads, which do not hold it back
                    # (backupfs's own threads do: test_a_stop_sent_to_the_process_while_held...).
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP)

        monkeypatch.setattr(dev.gate, "exclusive", signalled_on_exit)
        with pytest.raises(Stop):
            repo.backup("d", "incremental", scan=True)
        monkeypatch.undo()
        assert dev.job is None
        assert [b.kind for b in repo.backups("d")] == ["full"]
        assert not [f for f in os.listdir(tmp_path / "repo" / "devices" / "d") if f.startswith(".tmp-")]
    finally:
        signal.signal(signal.SIGHUP, previous)
        closer = threading.Thread(target=lambda: (repo.close(), closed.set()), daemon=True)
        closer.start()
        closer.join(30)
    assert closed.is_set(), "close() hung: the job stayed registered"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_kill_of_a_restore_or_backup_cleans_up_as_ctrl_c_does(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM (kill, systemctl stop) and SIGHUP (a closed terminal) used to
    leave a full-size hidden .restoring file beside the target forever, and
    a backup's temporary image until the next open."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 * MiB))  # the backup below, at 1 MiB/s, would take 32 s
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cli("backup", repo, "vm1", "full")
    target = tmp_path / "out" / "restored.img"
    target.parent.mkdir()
    target.write_bytes(b"the old file")

    def stop_when(proc: subprocess.Popen, appeared: Callable[[], bool]) -> str:
        try:
            while not appeared():
                assert proc.poll() is None, proc.communicate()
            proc.send_signal(sig)
            return proc.communicate(timeout=60)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)

    # Signalled in the copy, its first chunk on the way into the hidden file.
    in_the_copy = ("import engine.restore\n"
                   "write = engine.restore._write_sparse\n"
                   "def first_write_paused(fd, data, pos):\n"
                   "    if pos == 0:\n"
                   "        pause()\n"
                   "    return write(fd, data, pos)\n"
                   "engine.restore._write_sparse = first_write_paused\n")
    with paused_cli(["restore", str(repo), "vm1", "latest", str(target), "--force"], in_the_copy) as restore:
        assert [p for p in target.parent.iterdir() if p.name.endswith(".restoring")]
        restore.send_signal(sig)
        err = restore.communicate(timeout=60)[1]
    assert restore.returncode == 128 + sig and f"stopped by {sig.name}" in err, err
    assert [p.name for p in target.parent.iterdir()] == ["restored.img"]
    assert target.read_bytes() == b"the old file"

    backup = subprocess.Popen(backupfs_cmd() + ["backup", str(repo), "vm1", "full", "--rate", "1M"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = stop_when(backup, lambda: any(p.name.startswith(".tmp-") for p in (repo / "devices" / "vm1").iterdir()))
    assert backup.returncode == 128 + sig and f"stopped by {sig.name}" in err, err
    assert not [p for p in (repo / "devices" / "vm1").iterdir() if p.name.startswith(".tmp")]
    assert len(cli("list", repo).stdout.decode().splitlines()) == 2  # the header and the first full
    cli("backup", repo, "vm1", "incremental")  # the repository is free and whole


def test_removing_the_latest_then_an_interrupt_keeps_its_changes_dirty(tmp_path: Path) -> None:
    """`prune --remove LATEST` interrupted just after the catalog forgot it:
    the bitmap had not yet taken back that backup's changes, so the next
    incremental stored nothing and the backup differed from the source."""
    repo, src = _small_repo(tmp_path)
    try:
        repo.backup("d", "full")
        repo.device("d").write(3 * MiB, os.urandom(128 * 1024))
        latest = repo.backup("d", "incremental").record

        def step(name: str) -> None:
            if name == "catalog":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            repo.prune("d", remove=latest.id, hook=step)
    finally:
        repo.close()
    with Repository.open(str(tmp_path / "repo")) as again:
        assert [b.id for b in again.backups("d")] != [] and latest.id not in [b.id for b in again.backups("d")]
        result = again.backup("d", "incremental")
        assert result.bytes_written >= 128 * 1024
        assert again.verify("d").ok
    restored = tmp_path / "restored.img"
    cli("restore", tmp_path / "repo", "d", "latest", restored)
    assert restored.read_bytes() == src.read_bytes()


@pytest.mark.mount
def test_killing_the_writer_of_a_prune_stops_it_between_removals(tmp_path: Path) -> None:
    """A prune through the mount held its writer (even after kill -9) until
    every removal was done. Now it stops after the removal under way; what
    it removed is listed, the rest of the chain is whole."""
    with mounted_device(tmp_path, os.urandom(128 * MiB)) as m:
        repo = m.repo
        snapshot = m.path("vm1", "snapshot")
        sh(f"echo full > {snapshot}")
        for i in range(5):  # each removal of the oldest rewrites its child whole: 128 MiB
            sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=1M count=4 seek={i * 16} "
               f"conv=notrunc status=none && echo incremental > {snapshot}")
        before = backups(m)
        job = subprocess.Popen(["bash", "-c", f"echo 'prune keep_last=1' > {snapshot}"])
        try:
            while f"pid {job.pid} " not in status(m).get("requested by", ""):
                assert job.poll() is None, status(m)
            job.kill()
            job.wait(timeout=LET_GO)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(timeout=120)
        st = status(m)
        assert st["state"] == "cancelled", st
        assert "removed before that:" in st["cancelled"]
        left = backups(m)
        assert 1 < len(left) < len(before) or len(left) == len(before) - 1, (before, left)
        assert cli("verify", repo).returncode == 0
        sh(f"cmp {m.path('vm1', 'backups', 'latest')} {m.path('vm1', 'device')}")
        sh(f"echo 'prune keep_last=1' > {snapshot}")  # and a prune left alone finishes the job
        assert len(backups(m)) == 1
        sh(f"cmp {m.path('vm1', 'backups', 'latest')} {m.path('vm1', 'device')}")
        m.stop()


def _chain_of_nine(tmp_path: Path) -> tuple[Path, list[str]]:
    """A 32 MiB device with a full and 8 incrementals: a prune of all but
    the last rewrites 32 MiB per removal."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 * MiB))
    Repository.init(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo")) as repo:
        repo.add_device("vm1", str(src), 64 * 1024)
        dev = repo.device("vm1")
        ids = [repo.backup("vm1", "full").record.id]
        for i in range(8):
            dev.write(i * 4 * MiB, os.urandom(MiB))
            ids.append(repo.backup("vm1", "incremental").record.id)
    return src, ids


def _signal_prune_after_its_first_removal(tmp_path: Path, first_id: str, sig: signal.Signals,
                                          **popen: object) -> tuple[subprocess.Popen, str, str]:
    """The prune signalled as the first removal deletes its image (it held
    the signal until after the whole prune had run, on a loaded machine)."""
    first_removed = ("from engine import durable\n"
                     "unlink = durable.fs.unlink\n"
                     "def unlink_then_pause(path):\n"
                     "    unlink(path)\n"
                     f"    if path.endswith({first_id + '.qcow2'!r}):\n"
                     "        pause()\n"
                     "durable.fs.unlink = unlink_then_pause\n")
    with paused_cli(["prune", str(tmp_path / "repo"), "vm1", "--keep-last", "1"], first_removed,
                    start_new_session=True, **popen) as proc:
        assert not (tmp_path / "repo" / "devices" / "vm1" / f"{first_id}.qcow2").exists()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    return proc, out, err


def test_a_prune_started_ignoring_sigint_ignores_it(tmp_path: Path) -> None:
    """A script's background job (`prune ... &`) or nohup starts with SIGINT
    ignored: a Ctrl-C meant for the foreground must not stop it."""
    src, ids = _chain_of_nine(tmp_path)
    proc, out, err = _signal_prune_after_its_first_removal(
        tmp_path, ids[0], signal.SIGINT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0, (out, err)
    assert len(out.splitlines()) == 8 and err == "", (out, err)
    listed = [line.split("\t")[0] for line in cli("list", tmp_path / "repo", "vm1").stdout.decode().splitlines()[1:]]
    assert listed == ids[-1:]


def test_ctrl_c_of_a_direct_prune_stops_between_removals_and_says_what_went(tmp_path: Path) -> None:
    """An unmounted `backupfs prune` said only "interrupted" on Ctrl-C, so the
    operator could not tell what was left. The first Ctrl-C now lets the
    removal under way finish, stops, and lists what was removed; the chain
    left is whole."""
    src, ids = _chain_of_nine(tmp_path)
    proc, out, err = _signal_prune_after_its_first_removal(tmp_path, ids[0], signal.SIGINT)
    assert proc.returncode == 130, (out, err)
    assert "stopping after the backup being removed now" in err
    assert "interrupted: prune cancelled: Ctrl-C; removed before that: " in err, err
    removed = err.split("removed before that: ")[1].strip().split(", ")
    assert ids[0] in removed and len(removed) < 8, err
    assert [line.split()[1].rstrip(",") for line in out.splitlines()] == removed, out  # "removed: ID, ..."
    listed = [line.split("\t")[0] for line in cli("list", tmp_path / "repo", "vm1").stdout.decode().splitlines()[1:]]
    assert listed == [i for i in ids if i not in removed]
    assert cli("verify", tmp_path / "repo").returncode == 0
    restored = tmp_path / "latest.raw"
    cli("restore", tmp_path / "repo", "vm1", ids[-1], restored)
    sh(f"cmp {restored} {src}")


# Run in a process of its own: the test's (an xdist worker's) has threads of
# its own, which take process-directed signals as they please.
_HELD_STOP_WITH_WORKER_THREADS = r"""
import os, signal, threading
from backupfs.cli_common import Stopped, progress_reporter, stop_cleanly_on_signals
from engine.advisor import Advisor
from engine.ccache import DecompressedClusters
from engine.pipeline import copy_chunks
from engine.qcow2.compress import ClusterCompressor
from engine.stopsignals import STOP_SIGNALS

def sig_bits(field, tid=None):
    path = f"/proc/self/task/{tid}/status" if tid else "/proc/self/status"
    with open(path) as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1], 16)

TERM = 1 << (signal.SIGTERM - 1)
stop_cleanly_on_signals()
release = threading.Event()

def read(pos, out):
    if pos:  # the reader stays, a chunk ahead, while the first is written
        release.wait()
    return out

def write(pos, data):
    if pos:
        return
    tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    # This one, the advisor's, the copy's reader, tqdm's monitor, a
    # compressing and a decompressing pool's.
    assert len(tids) == 6, tids
    where = "held"
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` sends it: to the process
        # Until it is either raised here (a thread that does not block it
        # took it: the hold was defeated) or pending with every thread
        # blocking it.
        while not (sig_bits("ShdPnd") & TERM and all(sig_bits("SigBlk", t) & TERM for t in tids)):
            pass
        where = "released"
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        where = "after"
    except Stopped:
        print("stopped", where, flush=True)
    finally:
        release.set()

advisor = Advisor()
advisor.submit(lambda: None)
compressor = ClusterCompressor(4096, workers=1)
compressor.submit(memoryview(bytes(4096)))[0].result()
clusters = DecompressedClusters(lambda key: bytes(4096), lambda key: 4096)
clusters.prefetch([(0, 0)])
clusters.get((0, 0))
with progress_reporter(True, "x"):  # starts tqdm's monitor thread
    copy_chunks([(0, 4096), (4096, 4096)], read, write, 4096)
advisor.close()
compressor.close()
clusters.close()
"""


def test_a_stop_sent_to_the_process_while_held_waits_for_the_main_thread() -> None:
    """The hold (engine/stopsignals.py) blocks the stop signals in the main
    thread only. A signal sent to the process went to another thread that
    did not block them (tqdm's progress monitor on a terminal, the copy's
    reader, the read-ahead advisor, the zstd pools), and Python raised it in the main thread
    in the middle of the held code. Threads backupfs starts block them, so
    the signal waits, pending, and is raised where the hold ends."""
    proc = subprocess.run([sys.executable, "-c", _HELD_STOP_WITH_WORKER_THREADS], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0 and proc.stdout == "stopped released\n", (proc.stdout, proc.stderr)
