"""A source or a restore target held by what it is, not by where its path leads now.

A path is a name: whoever can write its directory can point it at another
file, another user's disk or /dev/null (a symlink, or ``mv other.img
src.img``). backupfs runs as root, so following such a name reads or
overwrites what its owner could not. So a device records the identity of
its source when it is added (a regular file: file system and inode; a block
device: its device number), every open checks that the path still leads to
it, and nothing is opened for I/O before that check: the path is first
opened with O_PATH (no driver is opened, no FIFO blocks) and O_NOFOLLOW,
checked with fstat, then opened for I/O through that very descriptor.

A symlink as the path's last component is followed only when nobody but
root (or the user backupfs runs as) can have made or changed it: owned by
one of them, in a directory one of them owns that no one else can write
(or a sticky one, like /tmp, where only its owner can replace it). Those are an administrator's names: udev's
/dev/VG/LV, /dev/mapper/NAME, /dev/disk/by-id/... A symlink in a directory
further up is the administrator's choice too; the identity check covers
whatever it leads to.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

FILE = "file"
BLOCK = "block"
RBD = "rbd"  # an RBD image: its pool's id (``dev``) and librbd's image id (``image``)


@dataclass(frozen=True)
class SourceId:
    """What a source is: a regular file (``dev``, ``ino``) or a block device (``rdev``)."""

    kind: str
    dev: int = 0
    ino: int = 0
    rdev: int = 0
    image: str = ""

    @classmethod
    def of(cls, st: os.stat_result) -> SourceId | None:
        """The identity of what ``st`` describes; None if it is neither a regular file nor a block device.

        A block device is its device number, not its node's inode: udev
        makes the node anew at each boot, the disk behind it stays.
        """
        if stat.S_ISREG(st.st_mode):
            return cls(FILE, st.st_dev, st.st_ino)
        if stat.S_ISBLK(st.st_mode):
            return cls(BLOCK, rdev=st.st_rdev)
        return None

    def encode(self) -> str:
        """As the catalog keeps it: "file DEV INO", "block RDEV" or "rbd POOLID IMAGEID"."""
        if self.kind == RBD:
            return f"rbd {self.dev} {self.image}"
        return f"file {self.dev} {self.ino}" if self.kind == FILE else f"block {self.rdev}"

    @classmethod
    def decode(cls, text: str) -> SourceId:
        """The inverse of encode; ValueError for anything else."""
        parts = text.split(" ")
        if parts[0] == FILE and len(parts) == 3:
            return cls(FILE, int(parts[1]), int(parts[2]))
        if parts[0] == BLOCK and len(parts) == 2:
            return cls(BLOCK, rdev=int(parts[1]))
        if parts[0] == RBD and len(parts) == 3 and parts[2].isalnum():
            return cls(RBD, dev=int(parts[1]), image=parts[2])
        raise ValueError(f"not a source identity: {text!r}")

    def describe(self) -> str:
        """In words, for an error message."""
        if self.kind == RBD:
            return f"the RBD image with id {self.image} (pool {self.dev})"
        if self.kind == FILE:
            return f"the file with inode {self.ino} on device {os.major(self.dev)}:{os.minor(self.dev)}"
        return f"block device {os.major(self.rdev)}:{os.minor(self.rdev)}"


class PathRefused(Exception):
    """A path that leads somewhere backupfs must not go; ``found`` says what
    it found there, ``link`` whether that was a symlink it would not follow."""

    def __init__(self, found: str, link: bool = False) -> None:
        super().__init__(found)
        self.found = found
        self.link = link


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(st: os.stat_result) -> str:
    """What ``st`` is, in words ("a character device")."""
    return next((name for test, name in _KINDS if test(st.st_mode)), "an unknown kind of file")


def trusted_link(path: str, link: os.stat_result) -> bool:
    """Whether the symlink ``path`` (lstat ``link``) is an administrator's:
    owned by root or by us, in a directory nobody else can change it in
    (owned by one of us too, and writable by nobody else or sticky)."""
    ours = (0, os.geteuid())
    if link.st_uid not in ours:
        return False
    try:
        parent = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return parent.st_uid in ours and (not parent.st_mode & 0o022 or bool(parent.st_mode & stat.S_ISVTX))


def _refuse_link(path: str, link: os.stat_result) -> None:
    if trusted_link(path, link):
        return
    try:
        points = os.readlink(path)
    except OSError:
        points = "?"
    if link.st_uid not in (0, os.geteuid()):
        raise PathRefused(f"a symlink (to {points}) made by user {link.st_uid}", link=True)
    raise PathRefused(f"a symlink (to {points}) in {os.path.dirname(os.path.abspath(path))}, where another "
                      "user can change it", link=True)


def hold_path(path: str) -> tuple[int, os.stat_result]:
    """An O_PATH descriptor of what ``path`` leads to, and its fstat.

    Follows a trusted symlink at the last component (see the module's
    docstring), refuses any other; opens nothing for I/O. OSError as open
    raises it (FileNotFoundError, PermissionError ...).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            _refuse_link(path, st)
            os.close(fd)
            fd = -1
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd, st


def identity_at(path: str) -> SourceId | None:
    """The identity of the disk ``path`` leads to now; None if it leads to
    none (missing, unreadable, refused, not a file or block device)."""
    try:
        fd, st = hold_path(path)
    except (OSError, PathRefused):
        return None
    os.close(fd)
    return SourceId.of(st)


def open_disk(path: str, flags: int, expected: SourceId | None = None) -> tuple[int, SourceId]:
    """Open the regular file or block device at ``path`` with ``flags``,
    checked before it is opened: (descriptor, its identity).

    Raises PathRefused for an untrusted symlink, anything that is neither a
    regular file nor a block device, or (``expected`` given) another file
    or disk than ``expected``; OSError as open raises it.
    """
    pfd, st = hold_path(path)
    try:
        found = SourceId.of(st)
        if found is None:
            raise PathRefused(kind_of(st))
        if expected is not None and found != expected:
            raise PathRefused(f"{found.describe()}, not {expected.describe()} it was bound to")
        return _reopen(pfd, path, flags, st), found
    finally:
        os.close(pfd)


def _reopen(pfd: int, path: str, flags: int, held: os.stat_result) -> int:
    """Open for I/O the very file ``pfd`` holds (through /proc, so the path
    cannot be switched in between); without /proc, by path, then checked."""
    if os.path.isdir("/proc/self/fd"):
        return os.open(f"/proc/self/fd/{pfd}", flags | os.O_CLOEXEC)
    fd = os.open(path, flags | os.O_CLOEXEC)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
        os.close(fd)
        raise PathRefused("another file than a moment before (it was switched while being opened)")
    return fd
