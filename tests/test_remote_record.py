"""A remote mount's runtime record: what `backupfs mount` (listing) and `umount` trust.

A remote has no directory of ours, so the daemon records itself (pid,
mount point, options) in ``$XDG_RUNTIME_DIR/backupfs-<uid>/``, or in
``/tmp/backupfs-<uid>/`` when there is no runtime directory: a name any
local user can take first. A record (or its directory) made by someone
else, a symlink, or a FIFO is not ours: it is ignored by the readers (the
listing would print a stranger's pid and options, `umount` would wait for
their process; a FIFO would hang both) and the daemon does not write into
a directory it does not own alone. No mount is needed: these are the
functions the listing, `umount` and the daemon call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backupfs.mountinfo import remote_daemon, remote_mount_record, runtime_record, write_runtime_record
from tests.users import OtherUser


@pytest.fixture
def runtime(open_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_RUNTIME_DIR: a directory any user may create entries in, as /tmp."""
    open_tmp.chmod(0o1777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(open_tmp))
    return open_tmp


def _record(mp: str, pid: int | None = None, options: list[str] | None = None) -> bytes:
    return json.dumps({"pid": os.getpid() if pid is None else pid, "mountpoint": mp, "repo": "s3://b/p",
                       "options": options or ["cache=/x"]}).encode()


def test_our_own_record_is_read(runtime: Path) -> None:
    mp = "/mnt/remote-own"
    write_runtime_record(mp, _record(mp))
    path = Path(runtime_record(mp))
    assert path.parent.stat().st_mode & 0o077 == 0
    rec = remote_mount_record(mp)
    assert rec is not None and rec.pid == os.getpid() and rec.options == ("cache=/x",)
    assert remote_daemon(mp) == os.getpid()


def test_a_record_planted_by_another_user_is_ignored(runtime: Path, other_user: OtherUser) -> None:
    """The neighbour takes backupfs-<our uid> first and writes a record naming their
    own process, with options that would break the listing's group lookup."""
    mp = "/mnt/remote-planted"
    path = Path(runtime_record(mp))
    other_user.run("mkdir", "-m", "0777", path.parent, check=True)
    planted = runtime / "planted.json"
    planted.write_bytes(_record(mp, options=["gid=" + "9" * 5000, "\x1b]0;owned\x07"]))
    os.chown(planted, other_user.uid, other_user.gid)
    os.rename(planted, path)
    assert remote_mount_record(mp) is None
    assert remote_daemon(mp) is None
    # Ours in name, in a directory the neighbour can change: not trusted either.
    os.chown(path, os.geteuid(), os.getegid())
    assert remote_mount_record(mp) is None
    # And the daemon does not write into it.
    with pytest.raises(OSError):
        write_runtime_record(mp, _record(mp))


def test_a_symlinked_or_fifo_record_is_ignored_at_once(runtime: Path) -> None:
    mp = "/mnt/remote-fifo"
    write_runtime_record(mp, _record(mp))
    path = Path(runtime_record(mp))
    real = path.with_name("elsewhere.json")
    os.rename(path, real)
    path.symlink_to(real.name)
    assert remote_mount_record(mp) is None
    path.unlink()
    os.mkfifo(path, 0o600)
    # In a process of its own: a reader that opens the FIFO waits for a writer for ever.
    code = ("import sys; from backupfs.mountinfo import remote_daemon, remote_mount_record; "
            f"sys.exit(0 if remote_daemon({mp!r}) is None and remote_mount_record({mp!r}) is None else 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ), cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
