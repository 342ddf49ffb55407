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


class ImageError(BackupfsError):
    """An image (or backing chain) we cannot read or that is damaged.

    Always names the file, because in a chain of 64 images "L2 table out of
    bounds" alone tells the user nothing.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class UsageError(BackupfsError):
    """Bad arguments from a user: a size, a name, a value out of range."""

    errno = _errno.EINVAL
