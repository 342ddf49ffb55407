"""Shared helpers: QEMU as the oracle.

Every image we read or write is checked against what qemu-img and qemu-io
say about it; these helpers run them and turn their answers into Python.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backupfs.mountinfo import wait_for_exit
from engine.repo import Repository


def run(*cmd: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    """Run a command; fail the test with its stderr if it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def qemu_img(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    return run("qemu-img", *args, cwd=cwd)


def qemu_io(image: str | os.PathLike[str], *commands: str, fmt: str = "qcow2") -> str:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = run(*args, str(image))
    if "error" in out.lower() or "failed" in out.lower():
        pytest.fail(f"qemu-io reported a failure: {out}")
    return out


def qemu_raw(image: str | os.PathLike[str], scratch: Path) -> bytes:
    """The disk as QEMU reconstructs it (`qemu-img convert -O raw`)."""
    out = scratch / f"qemu-raw-{os.getpid()}-{Path(image).name}.raw"
    try:
        qemu_img("convert", "-O", "raw", str(image), str(out))
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def qemu_map(image: str | os.PathLike[str]) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", str(image)))


def normalize_map(entries: list[dict]) -> list[tuple]:
    """Map entries as comparable tuples, merged where all fields agree.

    "compressed" is dropped: QEMU 7.2 does not report it. An offset is kept
    only where data is read from it: QEMU also prints the host cluster of
    zero or unallocated subclusters, which says nothing about the content.
    """
    out: list[list] = []
    for e in entries:
        offset = e.get("offset") if e["data"] else None
        row = [e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"], offset]
        if out:
            last = out[-1]
            same = last[2:6] == row[2:6]
            contiguous = (last[6] is None and row[6] is None) or (
                last[6] is not None and row[6] is not None and last[6] + last[1] == row[6]
            )
            if same and contiguous and last[0] + last[1] == row[0]:
                last[1] += row[1]
                continue
        out.append(row)
    return [tuple(r) for r in out]


def qemu_check(image: str | os.PathLike[str]) -> str:
    """`qemu-img check`, asserting no errors and no leaks."""
    proc = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"qemu-img check failed ({proc.returncode}):\n{text}"
    assert "No errors were found" in text, text
    assert "leaked" not in text.lower(), text
    return text


def qemu_compare(a: str | os.PathLike[str], b: str | os.PathLike[str], fmt_b: str = "raw") -> None:
    """`qemu-img compare` of contents, and equal virtual sizes.

    (Not -s: strict mode also compares allocation, which differs by design
    between a qcow2 and a raw file with the same bytes.)
    """
    proc = subprocess.run(
        ["qemu-img", "compare", "-F", fmt_b, str(a), str(b)], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"qemu-img compare {a} {b}: {proc.stdout}{proc.stderr}"
    sizes = [json.loads(qemu_img("info", "--output=json", str(p)))["virtual-size"] for p in (a, b)]
    assert sizes[0] == sizes[1], f"virtual sizes differ: {a} {sizes[0]}, {b} {sizes[1]}"


@pytest.fixture(params=["c", "python"])
def read_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a chain test with the C read loop and index sweep, and again with Python and numpy.

    The C ones must be there: setup.py builds them, and the install script
    installs gcc, so a missing build is a failure, not a quiet fallback.
    """
    import engine.chain

    if request.param == "c":
        from engine import _chainindex, _fastread  # noqa: F401  (fails the test if not built)

        assert engine.chain._fastread is not None, "engine._fastread is built but chain.py does not use it"
        assert engine.chain._chainindex is not None, "engine._chainindex is built but chain.py does not use it"
    else:
        monkeypatch.setattr(engine.chain, "_fastread", None)
        monkeypatch.setattr(engine.chain, "_chainindex", None)
    return str(request.param)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """An empty repository opened in this process, closed after the test
    (files whose tests drive the CLI or a mount define their own)."""
    Repository.init(str(tmp_path / "repo"))
    r = Repository.open(str(tmp_path / "repo"))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A directory for QEMU's raw conversions (on /dev/shm when there is room)."""
    return tmp_path


def backupfs_cmd() -> list[str]:
    """The installed console script (what users run), next to this Python."""
    script = Path(sys.executable).parent / "backupfs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "backupfs.cli"]


def cli(*args: str | os.PathLike[str], stdout: int | None = None, check: bool = True,
        cwd: str | os.PathLike[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `backupfs ARGS`; never a traceback, whatever the outcome."""
    proc = subprocess.run(
        backupfs_cmd() + [str(a) for a in args],
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        timeout=timeout,
    )
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    if check and proc.returncode != 0:
        pytest.fail(f"backupfs {' '.join(map(str, args))} exited {proc.returncode}: {err}")
    return proc


# -- real mounts ------------------------------------------------------------------------


# Every daemon a test starts, so that its log can be checked after the test.
_MOUNTS: list[Mounted] = []


class Mounted:
    """A repository mounted by `backupfs mount` (the daemon), for one test.

    ``expect_tracebacks``: the test provokes failures on purpose (injected
    faults, hostile images); otherwise a traceback in the daemon's log
    fails the test, even when every assertion passed.
    """

    def __init__(self, repo: Path, mountpoint: Path, env: dict[str, str] | None = None,
                 options: str | None = None, expect_tracebacks: bool = False, nofile: int | None = None) -> None:
        """``nofile``: the daemon's descriptor limit (soft and hard), as `ulimit -n` would set it."""
        self.repo = repo
        self.mnt = mountpoint
        self.env = env
        self.options = options
        self.nofile = nofile
        self.expect_tracebacks = expect_tracebacks
        self.pid: int | None = None
        _MOUNTS.append(self)

    def start(self) -> None:
        args = ["mount", str(self.repo), str(self.mnt)] + (["-o", self.options] if self.options else [])
        limit = self.nofile

        def set_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        proc = subprocess.run(backupfs_cmd() + args, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(self.env or {})}, preexec_fn=set_limit)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        self.pid = json.loads((self.repo / "mount.json").read_text())["pid"]

    def stop(self) -> None:
        """Unmount cleanly (the test's success path)."""
        proc = subprocess.run(backupfs_cmd() + ["umount", str(self.mnt)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the daemon we started, then clear the dead mount."""
        if self.pid is not None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            wait_for_exit(self.pid, 60)
            self.pid = None
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)

    def cleanup(self) -> None:
        """Whatever happened: no mount and no daemon of ours left behind."""
        if self.pid is not None or _is_mounted(self.mnt):
            proc = subprocess.run(backupfs_cmd() + ["umount", str(self.mnt)], capture_output=True,
                                  timeout=60)
            if proc.returncode != 0 or _is_mounted(self.mnt):
                self.kill()
            self.pid = None

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def log(self) -> str:
        try:
            return (self.repo / "backupfs.log").read_text()
        except OSError:
            return ""


@contextmanager
def mounted_device(tmp_path: Path, data: bytes | bytearray | Callable[[Path], None],
                   name: str = "vm1") -> Iterator[Mounted]:
    """A new repository with one device whose source holds ``data`` (fsynced),
    or that ``data(path)`` writes, mounted at tmp_path/mnt; unmounted whatever
    happens. ``.src`` is the source."""
    src = tmp_path / f"{name}.img"
    if callable(data):
        data(src)
    else:
        with open(src, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, name, src)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.src = src  # type: ignore[attr-defined]
    m.start()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture(autouse=True)
def daemon_logs_clean() -> Iterator[None]:
    """Fail a test whose daemon logged a traceback the test did not ask for.

    A handler turns an unexpected exception into EIO and logs it: the user
    sees one failed request, a test's assertions may not, the log does (the
    idea of s3ql's tests/pytest_checklogs.py). Checked after the test's own
    fixtures have unmounted, so the log is complete.
    """
    first = len(_MOUNTS)
    yield
    started = _MOUNTS[first:]
    del _MOUNTS[first:]
    for m in started:
        log = m.log()
        if not m.expect_tracebacks and "Traceback" in log:
            at = log.index("Traceback")
            pytest.fail(f"the daemon serving {m.repo} logged a traceback:\n{log[max(0, at - 2000) : at + 4000]}")


def _is_mounted(mnt: Path) -> bool:
    target = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def sh(command: str, check: bool = True, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess:
    """A shell command, as a user would type it."""
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"`{command}` exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the file's pages from the page cache, and make sure [offset, +length) went."""
    for _ in range(20):  # dropping can miss a page that is still busy: ask again
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not cached_pages(fd, offset, length):
            return
    pytest.fail("the kernel kept the image's pages cached")


def cached_pages(fd: int, offset: int, length: int) -> int:
    """Pages of [offset, offset+length) in the page cache, asked without
    reading them (a nowait read would start read-ahead of what it misses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    start = offset - offset % mmap.PAGESIZE
    size = offset + length - start
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of the image failed")
    try:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        if libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec)
    finally:
        libc.munmap(addr, size)


# -- another local user ------------------------------------------------------------------


class OtherUser:
    """An unprivileged local user made for the test session: the hostile or
    merely curious neighbour that the repository must keep out."""

    def __init__(self, name: str) -> None:
        import pwd

        entry = pwd.getpwnam(name)
        self.name = name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid

    def run(self, *cmd: str | os.PathLike[str], check: bool = False, timeout: float = 60,
            **kwargs: object) -> subprocess.CompletedProcess:
        """Run a command as this user (no supplementary groups), output captured as text."""
        return subprocess.run([str(c) for c in cmd], user=self.uid, group=self.gid, extra_groups=[],
                              capture_output=True, text=True, check=check, timeout=timeout,
                              **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A fresh system user with no home and no shell, removed after the session."""
    name = f"bfstest{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield OtherUser(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def open_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory another user can reach and list (tmp_path's parents are
    root's 0700 directories), removed after the test."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="bfs-open-", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
