"""The errors a repository's operations raise, apart from the repository
itself: a backup run (engine/backuprun.py) raises them too."""

from __future__ import annotations

import errno

from engine.errors import ErrnoError, is_disk_full


class RepositoryError(ErrnoError):
    """The repository refused or failed at something (its files, its lock, its layout)."""


class JobBusy(RepositoryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EBUSY)


def storage_error(e: OSError) -> RepositoryError:
    """A failed write to the repository, said as one: its disk full (ENOSPC), or which file failed."""
    if is_disk_full(e.errno):
        return RepositoryError(f"repository disk full: {e.strerror}", errno.ENOSPC)
    where = f" {e.filename}" if e.filename else ""
    return RepositoryError(f"repository write failed{where}: {e.strerror}", e.errno or errno.EIO)
