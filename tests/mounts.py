"""Real mounts: a repository mounted by the `backupfs mount` daemon, for one test.

Every daemon started here is remembered, so that conftest's
``daemon_logs_clean`` can fail a test whose daemon logged a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from backupfs.mountinfo import wait_for_exit
from tests.commands import backupfs_cmd, cli


# Every daemon a test starts, so that its log can be checked after the test.
STARTED_MOUNTS: list[Mounted] = []


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
        STARTED_MOUNTS.append(self)

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


def _is_mounted(mnt: Path) -> bool:
    target = os.path.abspath(mnt)
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:  # mount points need not be UTF-8
        return any(line.split()[4] == target for line in f)
