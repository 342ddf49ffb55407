"""The repository's durable writes, in one replaceable place.

Everything that makes repository state durable (image data, tables,
headers, checksum and bitmap files, renames, unlinks, directory fsyncs, and
catalog commits) goes through ``fs``. In production it is a straight line
to ``os``. Tests put a recording layer here to replay an operation up to
any instant and drop what a power loss would drop (everything not yet
fsynced), which proves the ordering data -> tables -> header -> catalog
instead of asserting it.

Reads, and writes to the live device (which belong to the guest, not to
the repository), do not go through here.
"""

from __future__ import annotations

import os


class FileSystem:
    """Pass-through to the operating system."""

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        """rename(2): atomic, replacing ``dst``."""
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def catalog_committed(self, db_path: str) -> None:
        """Called after every catalog commit (SQLite made it durable)."""


fs = FileSystem()


def install(layer: FileSystem) -> FileSystem:
    """Use ``layer`` for all repository writes; returns the previous one (tests)."""
    global fs
    previous = fs
    fs = layer
    return previous
