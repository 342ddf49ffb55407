"""The local repository's files, read for a push beside whoever owns it.

A push reads while the mount's daemon may take backups or prune. Images and
checksum files are sealed once their backup is committed; a prune replaces
a child's by rename. So a push opens each file (never through a symlink),
reads it only through that descriptor, and checks, after opening, that the
catalog still says what the push planned from and that the path still leads
to the inode it opened: the bytes sent are then exactly one committed
version of the backup, whatever runs beside.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from engine.catalog import BackupRecord, Catalog
from engine.errors import ErrnoError
from engine.layout import DEVICES
from engine.validate import NAME_RE


class ChangedBeside(ErrnoError):
    """The repository changed under the push (a prune ran): nothing wrong was sent."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} changed while the push read it (a prune ran beside it?); what was uploaded "
                         "stays there and is not sent again: run the push again", errno.EAGAIN)


@dataclass
class OpenFile:
    rel: str
    fd: int
    size: int


def _open_rel(root: str, rel: str) -> tuple[int, os.stat_result]:
    """``devices/NAME/FILE`` opened read-only, no symlink followed on the way."""
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] != DEVICES or not NAME_RE.fullmatch(parts[1]) or parts[2] in ("", ".", ".."):
        raise ErrnoError(f"{rel}: not a file of a device's directory")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(os.path.join(root, DEVICES), flags | os.O_DIRECTORY)
    try:
        dfd = os.open(parts[1], flags | os.O_DIRECTORY, dir_fd=fd)
        try:
            ffd = os.open(parts[2], flags | os.O_NONBLOCK, dir_fd=dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(fd)
    st = os.fstat(ffd)
    if not stat.S_ISREG(st.st_mode):
        os.close(ffd)
        raise ErrnoError(f"{os.path.join(root, rel)}: not a regular file")
    return ffd, st


def file_size(root: str, rel: str) -> int:
    """The size of a repository file now (the plan compares it with the remote's record)."""
    try:
        return os.stat(os.path.join(root, rel), follow_symlinks=False).st_size
    except OSError as e:
        raise ErrnoError(f"{os.path.join(root, rel)}: {e.strerror}") from None


def open_backup(root: str, catalog: Catalog, rec: BackupRecord) -> list[OpenFile]:
    """The backup's image (and checksums), opened and checked against ``rec``."""
    opened: list[OpenFile] = []
    try:
        for rel in [r for r in (rec.image, rec.checksums) if r]:
            try:
                fd, st = _open_rel(root, rel)
            except FileNotFoundError:
                raise ChangedBeside(f"backup {rec.id}") from None
            except OSError as e:
                raise ErrnoError(f"{os.path.join(root, rel)}: cannot read it: {e.strerror}") from None
            opened.append(OpenFile(rel, fd, st.st_size))
            try:
                now = os.stat(os.path.join(root, rel), follow_symlinks=False)
            except OSError:
                raise ChangedBeside(f"backup {rec.id}") from None
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                raise ChangedBeside(f"backup {rec.id}")
        still_same(catalog, [rec])
    except BaseException:
        close_all(opened)
        raise
    return opened


def still_same(catalog: Catalog, records: list[BackupRecord]) -> None:
    """The catalog still records these backups as they were planned, and no prune is half done."""
    if catalog.pending_removals():
        raise ChangedBeside("the repository")
    for rec in records:
        if catalog.backup(rec.id) != rec:
            raise ChangedBeside(f"backup {rec.id}")


def close_all(files: list[OpenFile]) -> None:
    for f in files:
        try:
            os.close(f.fd)
        except OSError:
            pass
