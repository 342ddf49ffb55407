"""A restore writes only where root meant it to (SPEC 7): never through a symlink.

The attacker is another local user who can write the directory a restore
target lies in (their own, or /tmp): they plant a symlink at the target's
name, or at the name of the hidden copy a restore writes first, or a file
of their own at the target, and wait for root's restore. Nothing outside
the target's own name may be created or changed.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.commands import cli, repo_with_a_full, sh
from tests.mounts import Mounted
from tests.users import OtherUser

MiB = 1024 * 1024
SIZE = 2 * MiB


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """A repository with one full backup of vm1 (random bytes)."""
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(1).randbytes(SIZE))
    return repo_with_a_full(tmp_path / "repo", "vm1", src)



def _refused(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    return err


def test_a_restore_target_that_is_a_symlink_is_refused(
    repo_dir: Path, tmp_path: Path, user_dir: Path, other_user: OtherUser
) -> None:
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    precious = root_only / "precious.raw"
    precious.write_bytes(b"root's data" * 1000)
    before = _sha(precious)

    dangling = user_dir / "restore.raw"  # leads to a file root alone could create
    assert other_user.run("ln", "-s", root_only / "created.raw", dangling).returncode == 0
    to_file = user_dir / "disk.raw"
    assert other_user.run("ln", "-s", precious, to_file).returncode == 0
    into_repo = user_dir / "repo-link"  # a directory link into the repository
    assert other_user.run("ln", "-s", repo_dir / "devices" / "vm1", into_repo).returncode == 0

    for target, force in ((dangling, ()), (dangling, ("--force",)), (to_file, ("--force",))):
        err = _refused(cli("restore", repo_dir, "vm1", "latest", target, *force, check=False))
        assert f"restore target {target} is a symlink" in err, err
    err = _refused(cli("restore", repo_dir, "vm1", "latest", into_repo / "x.raw", check=False))
    assert "lies inside the repository" in err, err

    assert sorted(os.listdir(root_only)) == ["precious.raw"] and _sha(precious) == before
    assert sorted(os.listdir(user_dir)) == ["disk.raw", "repo-link", "restore.raw"]
    assert dangling.is_symlink() and to_file.is_symlink()


def test_a_file_another_user_planted_at_the_target_lends_it_no_mode(
    repo_dir: Path, user_dir: Path, other_user: OtherUser
) -> None:
    """Replaced whole by a file of root's that stays private, not one readable by all."""
    target = user_dir / "vm.raw"
    assert other_user.run("sh", "-c", f"umask 0; : > {target}; chmod 0666 {target}").returncode == 0
    cli("restore", repo_dir, "vm1", "latest", target, "--force")
    st = target.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert _sha(target) == _sha(repo_dir.parent / "src.raw")
    assert other_user.run("cat", target).returncode != 0


def test_a_symlink_planted_at_the_hidden_copys_name_is_passed_over(tmp_path: Path) -> None:
    from engine.restore import _create_hidden_copy

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    planted = ".disk.raw.planted.restoring"
    os.symlink(victim, tmp_path / planted)
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, name = _create_hidden_copy(dirfd, "disk.raw", [planted, ".disk.raw.fresh.restoring"])
        os.write(fd, b"restored bytes")
        os.close(fd)
    finally:
        os.close(dirfd)
    assert name == ".disk.raw.fresh.restoring"
    assert victim.read_bytes() == b"keep" and (tmp_path / planted).is_symlink()
    assert (tmp_path / name).read_bytes() == b"restored bytes"


@pytest.mark.mount
def test_restoring_through_a_symlink_to_a_mounted_device_file_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo_dir, tmp_path / "mnt")
    m.start()
    try:
        link = tmp_path / "vm1-device"
        link.symlink_to(m.path("vm1", "device"))
        sh(f"printf 'changed' | dd of={m.path('vm1', 'device')} bs=1 conv=notrunc status=none")
        err = _refused(cli("restore", repo_dir, "vm1", "latest", link, "--force", check=False))
        assert f"restore target {link} is a symlink" in err, err
        assert m.path("vm1", "device").read_bytes()[:7] == b"changed"
    finally:
        m.cleanup()
