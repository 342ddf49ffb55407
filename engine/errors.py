"""The exceptions the engine raises on purpose.

Everything the engine refuses or fails at is a ``BackupfsError`` whose
message is one line a user can act on; anything else escaping the engine is
a bug. The CLI prints the message, the filesystem maps it to an errno.
"""

from __future__ import annotations

import errno as _errno


class BackupfsError(Exception):
    """A problem we can explain in one line; ``errno`` is what FUSE returns."""

    errno: int = _errno.EIO


class ErrnoError(BackupfsError):
    """A failure that carries its own errno (EIO unless told otherwise).

    The base of each engine module's error (``RepositoryError``,
    ``JobError``, ``DeviceError``...): they stay separate classes so a caller
    can tell whose failure it is, and share the one constructor.
    """

    def __init__(self, message: str, err: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


# Every errno that means a write found no room: the disk is full, or the
# user's quota is (EDQUOT). The repository reports both as its disk being full.
DISK_FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})


def is_disk_full(err: int | None) -> bool:
    """Whether an errno says the disk (or the user's quota) has no room left."""
    return err in DISK_FULL_ERRNOS


class ImageError(BackupfsError):
    """An image (or backing chain) we cannot read or that is damaged.

    Always names the file, because in a chain of 64 images "L2 table out of
    bounds" alone tells the user nothing.
    """

    def __init__(self, path: str, problem: str, err: int | None = None) -> None:
        self.path = path
        self.problem = problem
        if err is not None:
            self.errno = err
        super().__init__(f"{path}: {problem}")

    @property
    def out_of_resources(self) -> bool:
        """Not the image's fault: the process ran out of descriptors or memory."""
        return self.errno in OUT_OF_RESOURCES


# Errors that say nothing about an image: a retry with more room can succeed.
OUT_OF_RESOURCES = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOMEM})


class UsageError(BackupfsError):
    """Bad arguments from a user: a size, a name, a value out of range."""

    errno = _errno.EINVAL
