"""The rules of group access to a mount, without a mount (backupfs/mountaccess.py,
the options in backupfs/mountinfo.py, the allow_other check in backupfs/mount.py).
The real mount, with real users, is tests/test_group_access.py."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from backupfs.mount import allow_other_refused
from backupfs.mountaccess import MountAccess, describe_options, guest_allows, read_groups
from backupfs.mountinfo import our_options, parse_options
from engine.errors import UsageError


def test_group_options_are_checked_and_kept_by_number() -> None:
    root = grp.getgrgid(0).gr_name
    assert parse_options(f"allow_group={root},umask=27,noatime") == ["allow_group=0", "umask=027", "noatime"]
    assert parse_options("gid=0") == ["gid=0"]
    for bad, says in (("allow_group=no-such-group-here", "unknown group"), ("gid=", "needs a group"),
                      ("umask=8", "not an octal mask"), ("umask=1000", "not an octal mask")):
        with pytest.raises(UsageError, match=says):
            parse_options(bad)
    assert our_options(["allow_group=0", "noatime", "files_owner_only"]) == (
        ["allow_group=0", "files_owner_only"], ["noatime"])
    assert describe_options(("nosuid", "allow_group=0", "gid=0")) == f"nosuid,allow_group={root},gid={root}"


def test_what_each_option_means() -> None:
    both = MountAccess.from_options(["allow_group=50"], owner=1000)
    assert (both.group, both.shown_gid, both.umask, both.shared) == (50, 50, 0o027, True)
    shown = MountAccess.from_options(["gid=50", "umask=007"], owner=1000)
    assert (shown.group, shown.shown_gid, shown.umask, shown.shared) == (None, 50, 0o007, True)
    private = MountAccess.from_options([], owner=1000)
    assert (private.shared, private.umask, private.gid(7)) == (False, 0, 7)
    assert both.mode(stat.S_IFDIR | 0o755, guest_owned=False) == stat.S_IFDIR | 0o750
    assert both.mode(stat.S_IFREG | 0o600, guest_owned=False, group_readable=True) == stat.S_IFREG | 0o640
    assert private.mode(stat.S_IFREG | 0o600, guest_owned=False, group_readable=True) == stat.S_IFREG | 0o600
    assert both.mode(stat.S_IFREG | 0o604, guest_owned=True) == stat.S_IFREG | 0o604  # the guest's own
    assert both.mode(stat.S_IFLNK | 0o777, guest_owned=False) == stat.S_IFLNK | 0o777


def test_members_are_told_by_their_groups_of_the_moment() -> None:
    """Primary group, supplementary groups (from /proc, as this very process
    has them), the owner and root; a vanished process has no groups."""
    assert read_groups(os.getpid()) == frozenset(os.getgroups())
    assert read_groups(0) == frozenset() and read_groups(2**22 + 12345) == frozenset()
    access = MountAccess(owner=1000, group=4242)
    assert access.lets_in(1000, 1, 0) and access.lets_in(0, 1, 0)  # the owner, root
    assert access.lets_in(2000, 4242, 0)  # primary group
    assert not access.lets_in(2000, 1, os.getpid())  # not in our groups (we are not in 4242)
    ours = MountAccess(owner=1000, group=os.getgroups()[0] if os.getgroups() else os.getgid())
    assert ours.lets_in(2000, 1, os.getpid()) == bool(os.getgroups())
    assert MountAccess(owner=1000).lets_in(2000, 1, 0)  # no allow_group: the kernel decides


def test_a_guest_entry_is_judged_by_its_other_bits() -> None:
    assert guest_allows(0o644, os.R_OK) and guest_allows(0o755, os.X_OK)
    assert not guest_allows(0o600, os.R_OK) and not guest_allows(0o700, os.X_OK)
    assert not guest_allows(0o640, os.R_OK) and not guest_allows(0o754, os.X_OK)


def test_allow_other_for_a_user_needs_user_allow_other(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    said = allow_other_refused(["allow_other"], str(conf), euid=1000)
    assert said is not None and "user_allow_other" in said and str(conf) in said
    assert allow_other_refused(["allow_other"], str(tmp_path / "missing"), euid=1000) is not None
    assert allow_other_refused(["allow_other"], str(conf), euid=0) is None
    assert allow_other_refused(["noatime"], str(conf), euid=1000) is None
    conf.write_text("user_allow_other  # for the backup operators\n")
    assert allow_other_refused(["allow_other"], str(conf), euid=1000) is None
