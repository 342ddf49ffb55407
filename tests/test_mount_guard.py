"""The `mount` marker's guard: it must see every way a test mounts, and
nothing else, or `-m "not mount"` runs a test that needs root and FUSE."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.mount_guard import what_mounts


@pytest.mark.parametrize(("argv", "found"), [
    (["mount", "-t", "tmpfs", "tmpfs", "/x"], "mount"),
    (["/usr/bin/losetup", "-f", "--show", "/x"], "losetup"),
    (["fusermount3", "-uz", "/x"], "fusermount3"),
    (["/sbin/mount.backupfs", "/r", "/m"], "mount.backupfs"),
    (["bash", "-c", "mkfs.ext4 -q /x && losetup -f --show /x"], "losetup"),
    (["bash", "-c", "fuse2fs /img /mnt -o fakeroot"], "fuse2fs"),
    (["/venv/bin/backupfs", "mount", "/r", "/m"], "backupfs mount"),
    ([sys.executable, "-m", "backupfs.cli", "mount", "/r", "/m"], "backupfs mount"),
    (["/venv/bin/backupfs", "backup", "/r", "vm1"], None),
    (["/venv/bin/backupfs", "status", "/test_a_mount_point/repo"], None),
    (["bash", "-c", "dd if=/dev/zero of=/tmp/test_mount_x/mnt/f bs=1M count=1"], None),
    (["qemu-img", "info", "/mount/x.qcow2"], None),
])
def test_what_mounts_names_the_mounting_command(argv: list[str], found: str | None) -> None:
    assert what_mounts(argv) == found


def test_an_unmarked_test_that_mounts_fails() -> None:
    """This test is not marked `mount`: starting losetup (here only to print
    its version) must fail it before the process starts."""
    with pytest.raises(pytest.fail.Exception, match="not marked `mount`"):
        subprocess.run(["losetup", "--version"], capture_output=True)


@pytest.mark.mount
def test_a_marked_test_may_mount() -> None:
    assert subprocess.run(["losetup", "--version"], capture_output=True).returncode == 0
