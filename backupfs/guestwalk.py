"""Paths inside a backup as users write them (``p2/etc/fstab``), and walks of guest trees.

Shared by `backupfs ls`, `dump` and `restore --include` (backupfs/cli_files.py):
each names a volume and a path below it, wants one clear line when either
is missing, and walks a tree in the same order (names sorted bytewise,
parents before children) so that a listing, a tar stream and a restore of
one tree agree entry for entry.

Every name here is the guest's bytes; nothing is resolved on the host and
no guest symlink is followed: a walk lists a link as a link.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from engine.errors import BackupfsError, UsageError
from engine.guest.guestdisk import GuestDisk
from engine.guest.guestfs import GuestEntry
from engine.guest.volume import GuestPath, Volume
from engine.text import escape


class NoSuchPath(BackupfsError):
    """A volume or a path inside one that the backup does not hold."""

    errno = errno.ENOENT


def split_path(path: str) -> tuple[str, GuestPath]:
    """``p2/etc/fstab`` as the volume's name and the names below it.

    Empty components and ``.`` are dropped as a shell user expects; ``..``
    is refused rather than resolved, since nothing on the host may decide
    where a guest path leads.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise UsageError(f"{escape(path)}: '..' is not allowed in a path inside a backup")
    if not parts:
        return "", ()
    return parts[0], tuple(p.encode("utf-8", "surrogateescape") for p in parts[1:])


def shown(names: GuestPath) -> str:
    """Guest names joined with ``/`` as printable text (escaped, one line)."""
    return escape("/".join(n.decode("utf-8", "surrogateescape") for n in names))


@dataclass
class Target:
    """What a PATH argument named: the volume, the names below it, its entry."""

    volume: Volume
    path: GuestPath
    entry: GuestEntry

    @property
    def shown(self) -> str:
        """The path as the user would write it, escaped: ``p2/etc/fstab``."""
        return "/".join(s for s in (escape(self.volume.name), shown(self.path)) if s)


def open_volume(disk: GuestDisk, name: str) -> Volume:
    """The volume called ``name``; a one-line error naming the volumes there
    are when it is not one of them (GuestDamaged, with the engine's reason,
    when it is there but cannot be read)."""
    names = [info.name for info in disk.infos()]
    if name not in names:
        there = ", ".join(escape(n) for n in names) or "none found"
        raise NoSuchPath(f"no volume {escape(name)!r} in this backup (volumes: {there})")
    return disk.volume(name)


def find(disk: GuestDisk, path: str) -> Target:
    """The entry a PATH argument names; NoSuchPath (one line) when there is none."""
    name, below = split_path(path)
    if not name:
        raise UsageError("give a path inside the backup, starting with its volume (e.g. p2/etc)")
    volume = open_volume(disk, name)
    target = Target(volume, below, volume.entry(()))
    for depth in range(1, len(below) + 1):
        try:
            target.entry = volume.entry(below[:depth])
        except FileNotFoundError:
            raise NoSuchPath(f"no such path in this backup: {target_text(volume, below[:depth])}") from None
        except NotADirectoryError:
            raise NoSuchPath(f"not a directory in this backup: {target_text(volume, below[:depth - 1])}") from None
    return target


def target_text(volume: Volume, path: GuestPath) -> str:
    return "/".join(s for s in (escape(volume.name), shown(path)) if s)


def walk(volume: Volume, top: GuestPath, entry: GuestEntry) -> Iterator[tuple[GuestPath, GuestEntry]]:
    """``top`` and everything below it, parents first, names in byte order.

    Yields paths relative to ``top`` (``()`` for ``top`` itself). Iterative,
    so a guest's deep tree costs memory for its listings on the way down,
    not Python's recursion limit.
    """
    yield (), entry
    if not entry.is_dir:
        return
    stack: list[tuple[GuestPath, Iterator[tuple[bytes, GuestEntry]]]] = [((), children(volume, top))]
    while stack:
        rel, pending = stack[-1]
        step = next(pending, None)
        if step is None:
            stack.pop()
            continue
        name, child = step
        path = rel + (name,)
        yield path, child
        if child.is_dir:
            stack.append((path, children(volume, top + path)))


def children(volume: Volume, path: GuestPath) -> Iterator[tuple[bytes, GuestEntry]]:
    """A directory's entries sorted by name bytes."""
    listing = volume.listing(path)
    return iter(sorted(listing.items()))


def kind_of(mode: int) -> str:
    """The type word used in JSON and messages."""
    for test, word in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISBLK, "blockdev")):
        if test(mode):
            return word
    return "unknown"


def hard_link_key(volume: Volume, entry: GuestEntry) -> tuple[str, object] | None:
    """What makes two entries one inode (so one tar member, one restored file):
    its key within its volume, for a non-directory that says it has other
    names. None for the rest, so that a filesystem whose keys are not unique
    for files of one link (FAT's empty files) never joins two files."""
    if entry.is_dir or entry.nlink < 2:
        return None
    return (volume.name, entry.key)
