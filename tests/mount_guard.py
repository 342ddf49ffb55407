"""Keep the `mount` marker honest: only a test marked `mount` may mount.

`./scripts/test -m "not mount"` must run on a machine without FUSE, root
or loop devices, so a test that mounts without the marker is a bug in the
test. Rather than trust every test's author to mark it, a Python audit hook
sees every process the test process starts and fails the test that starts
a mount (`backupfs mount`, mount, umount, losetup, fusermount, fuse2fs)
while unmarked, naming the marker it lacks.

This module is a pytest plugin (conftest names it in ``pytest_plugins``):
each test is judged from before its first fixture is set up (a module-scoped
fixture that mounts counts for the first test that asks for it) until its
teardown starts (unmounting is not judged: what was mounted was judged). Outside a test (collection, bench/) nothing is checked.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

import pytest

# Programs that mount, unmount or attach a loop device.
MOUNTING_PROGRAMS = frozenset({"mount", "umount", "losetup", "fusermount", "fusermount3", "fuse2fs"})

# The same programs as words of a shell command line (`sh("losetup -f ...")`).
_MOUNTING_WORD = re.compile(r"(?:^|[\s;&|(`])(?:" + "|".join(sorted(MOUNTING_PROGRAMS)) + r")(?=\s|$)")

# The node id of the running test that is not marked `mount`; None while a
# marked test runs, or outside a test (bench/, collection).
_unmarked_test: str | None = None


def what_mounts(args: Sequence[object]) -> str | None:
    """The mounting command in a process's argument list, or None if it mounts nothing."""
    words = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    if not words:
        return None
    program = os.path.basename(words[0])
    if program in MOUNTING_PROGRAMS or program.startswith("mount."):  # mount.backupfs, mount.fuse
        return program
    if program in ("bash", "sh") and len(words) >= 3 and words[1] == "-c":
        found = _MOUNTING_WORD.search(words[2])
        return found.group(0).strip(" \t;&|(`") if found else None
    is_backupfs = program == "backupfs" or (len(words) >= 3 and words[1:3] == ["-m", "backupfs.cli"])
    if is_backupfs:
        rest = words[1:] if program == "backupfs" else words[3:]
        if rest[:1] == ["mount"]:
            return "backupfs mount"
    return None


def _audit(event: str, args: tuple) -> None:
    """The audit hook: fail an unmarked test that starts a mounting process."""
    if event != "subprocess.Popen" or _unmarked_test is None:
        return
    argv = args[1]
    if isinstance(argv, (str, bytes)):
        argv = [argv]
    command = what_mounts(list(argv or [args[0]]))
    if command is not None:
        pytest.fail(f"{_unmarked_test} runs `{command}` but is not marked `mount`: "
                    "add @pytest.mark.mount (or pytestmark = pytest.mark.mount for a file where every "
                    "test mounts), so that `-m 'not mount'` leaves it out", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    """Install the audit hook, once per test process (hooks cannot be removed)."""
    sys.addaudithook(_audit)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """From before the test's fixtures are set up, judge what it starts."""
    global _unmarked_test
    _unmarked_test = None if item.get_closest_marker("mount") is not None else item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop judging before teardown: the last test of a module also tears down
    the module's fixtures, whose unmount belongs to the tests that used them."""
    global _unmarked_test
    _unmarked_test = None
