"""Commands as a user types them: the installed `backupfs`, and the shell.

Each fails the test with the command's stderr when it fails, and `cli`
also when the command printed a traceback, whatever its exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


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


def sh(command: str, check: bool = True, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess:
    """A shell command, as a user would type it."""
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"`{command}` exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def repo_with_a_full(repo: Path, name: str, source: Path) -> Path:
    """What `backupfs init REPO`, `device add REPO NAME SOURCE` and `backup
    REPO NAME full` leave (the same files and modes), made in this process:
    for the fixtures of tests whose point comes after, the three commands'
    start-up (about a second of CPU) saved."""
    from engine.repo import Repository

    Repository.init(str(repo))
    with Repository.open(str(repo)) as r:
        r.add_device(name, str(source))
        r.backup(name, "full")
    return repo
