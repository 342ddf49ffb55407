"""What `backupfs dump` writes: a guest file's bytes, or a guest tree as a tar stream.

Both stream: a file goes out in ``PIECE`` bytes at a time, a tree through
``tarfile`` in stream mode (``w|``), one member at a time, so memory stays
bounded whatever the file or the tree holds. Tar member names are the path
below the volume (``dump p2/etc`` gives ``etc/``, ``etc/fstab``), the same
layout `restore --include p2/etc` makes, so `dump ... | tar -x -C DIR` and
`restore ... DIR --include ...` agree. Owners are numeric (the guest's
user names mean nothing here); a second name of one inode is a tar hard
link; FIFOs and device nodes are their tar types; sockets cannot be in a
tar and are left out with a note.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from typing import BinaryIO

from engine.guest.guestfs import FileData, GuestEntry
from engine.guest.volume import GuestPath, Volume

from backupfs.guestwalk import Target, hard_link_key, target_text, walk

PIECE = 1024 * 1024


def write_file(volume: Volume, path: GuestPath, fd: int) -> None:
    """A regular file's bytes to ``fd``, a piece at a time (BrokenPipeError
    goes to the caller: the reader left)."""
    data = volume.data(path)
    for offset in range(0, data.size, PIECE):
        piece = memoryview(volume.read_data(data, offset, PIECE))
        while piece:
            piece = piece[os.write(fd, piece):]


class GuestFileReader:
    """A guest file as the file object ``tarfile`` copies from: reads a piece
    from the volume and hands it out in the small reads tarfile makes."""

    def __init__(self, volume: Volume, data: FileData) -> None:
        self._volume = volume
        self._data = data
        self._offset = 0  # in the file, of the piece after the buffer
        self._buffer = b""
        self._at = 0  # in the buffer: what was handed out (no copy of the rest at each read)

    def read(self, size: int = -1) -> bytes:
        if self._at >= len(self._buffer):
            if self._offset >= self._data.size:
                return b""
            self._buffer = self._volume.read_data(self._data, self._offset, PIECE)
            self._at = 0
            if not self._buffer:
                return b""
            self._offset += len(self._buffer)
        end = len(self._buffer) if size < 0 else min(len(self._buffer), self._at + size)
        out = self._buffer[self._at:end]
        self._at = end
        return out


def _member(name: str, entry: GuestEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(entry.mode)
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = max(0, entry.mtime_ns // 1_000_000_000)
    return info


def write_tar(target: Target, out: BinaryIO, note: Callable[[str], None]) -> None:
    """The tree at ``target`` as a tar stream on ``out``; ``note`` hears what was left out."""
    volume = target.volume
    first_names: dict[tuple[str, object], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for rel, entry in walk(volume, target.path, target.entry):
            full = target.path + rel
            name = "/".join(n.decode("utf-8", "surrogateescape") for n in full) or "."
            info = _member(name, entry)
            key = hard_link_key(volume, entry)
            if key is not None and key in first_names:
                info.type, info.linkname = tarfile.LNKTYPE, first_names[key]
                tar.addfile(info)
                continue
            if key is not None:
                first_names[key] = name
            if entry.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.is_file:
                info.size = entry.size
                tar.addfile(info, GuestFileReader(volume, volume.data(full)))
            elif entry.is_link:
                info.type = tarfile.SYMTYPE
                info.linkname = volume.readlink(full).decode("utf-8", "surrogateescape")
                tar.addfile(info)
            elif stat.S_ISFIFO(entry.mode) or stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
                info.type = (tarfile.FIFOTYPE if stat.S_ISFIFO(entry.mode)
                             else tarfile.CHRTYPE if stat.S_ISCHR(entry.mode) else tarfile.BLKTYPE)
                info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
                tar.addfile(info)
            else:
                note(f"{target_text(volume, full)}: a socket cannot be put in a tar; left out")

