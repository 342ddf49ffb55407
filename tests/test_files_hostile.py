"""A hostile review of the files view (MOUNT/<device>/files/): each test is a finding.

Each test here failed before its fix: another local user seeing guest
files that ``files_owner_only`` keeps from them, the daemon dropping a
guest node the kernel still held, an open file's disk never closed after
a prune, and two guest nodes given one inode number by racing workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.commands import cli
from tests.guestdisks import Disk, whole_disk
from tests.mounts import Mounted
from tests.users import OtherUser


def _repo_with(tmp_path: Path, disk: Disk) -> Path:
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", disk.image)
    cli("backup", repo, "vm", "full")
    return repo


@pytest.mark.mount
def test_files_owner_only_keeps_others_out_of_what_the_owner_already_walked(
        tmp_path: Path, other_user: OtherUser, open_tmp: Path) -> None:
    """The kernel keeps guest names and attributes for an hour: once the
    owner has walked a volume, another user's path walk never reaches our
    handlers. The kernel itself must refuse them (the directories' modes)."""
    repo = _repo_with(tmp_path, whole_disk(tmp_path))
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    m = Mounted(repo, mnt, options="allow_other,files_owner_only")
    m.start()
    try:
        here = mnt / "vm" / "files" / "latest" / "disk"
        assert (here / "etc" / "hostname").read_text() == "guest\n"  # the owner (root) walks it
        for _ in os.walk(here):
            pass
        for what in (here / "etc" / "hostname", here / "home" / "alice" / "notes.txt", here / "etc"):
            seen = other_user.run("stat", "-c", "%s %u %a", what)
            assert seen.returncode != 0 and "Permission denied" in seen.stderr, (what, seen.stdout)
        listed = other_user.run("ls", mnt / "vm" / "files" / "latest")
        assert listed.returncode != 0 and "Permission denied" in listed.stderr, listed.stdout
        # What is not a backup's files stays as it was: the owner-only rule is for files/<id>.
        assert other_user.run("ls", mnt / "vm" / "files").returncode == 0
        m.stop()
    finally:
        m.cleanup()
