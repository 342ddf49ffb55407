"""Who may read the repository: its owner, or the one group it was made for.

A repository holds whole disks, so it is private whatever the umask of the
process that writes it: directories 0700, files 0600. `init --group G`
shares it for reading with G: directories 2750 (setgid, so that everything
created inside gets G) and files 0640.

The directory a file or directory is created in says which: everything
backupfs creates in a repository takes the mode its directory calls for
(``file_mode_in``, ``dir_mode_in``) and sets it explicitly, so neither a
umask nor the code path (the CLI, the mount daemon, a library caller) can
leave a disk readable. ``secure`` brings an existing repository, made by
an older version or touched by hand, to the same state when it is opened.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from dataclasses import dataclass

from engine.errors import BackupfsError, UsageError

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
GROUP_DIR = 0o2750  # setgid: what is created inside gets the directory's group
GROUP_FILE = 0o640

# Files backupfs takes locks on: the repository's ``lock`` (flock) and
# ``catalog.db`` with its ``-wal``, ``-shm`` and ``-journal`` (SQLite's fcntl
# locks; their mode follows the database's). A lock needs only a descriptor
# open for reading, so whoever may read such a file may hold its lock for
# ever: a member of a repository's group could stop every backup, mount and
# catalog write. They stay the owner's alone, in a group-readable repository too.
def owner_only(name: str) -> bool:
    """Whether the file ``name`` at the repository's top is kept 0600 whatever the access."""
    return name == "lock" or name.startswith("catalog.db")


# What the engine has to tell the user outside any error (e.g. that a
# repository was made private); the CLI prints these on stderr.
notices = logging.getLogger("backupfs.notice")


@dataclass(frozen=True)
class Access:
    """Who may read a repository: its owner only (``gid`` None), or also group ``gid``."""

    gid: int | None = None

    @property
    def dir_mode(self) -> int:
        return PRIVATE_DIR if self.gid is None else GROUP_DIR

    @property
    def file_mode(self) -> int:
        return PRIVATE_FILE if self.gid is None else GROUP_FILE

    def describe(self) -> str:
        """'private (0700/0600)': what ``secure`` made the repository, for the notice."""
        if self.gid is None:
            return "private (0700/0600)"
        return f"readable by group {group_name(self.gid)} only (2750/0640)"


def group_name(gid: int) -> str:
    """The group's name, or its number when it has none (any more)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def resolve_group(group: str) -> int:
    """The gid of ``group`` (a name or a number); an unknown one is refused
    before anything is created, rather than leaving a repository nobody meant."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        try:
            return grp.getgrgid(int(group)).gr_gid
        except KeyError:
            pass
    raise UsageError(f"unknown group {group!r}: create it first (groupadd), or give an existing one")


def _shared(mode: int) -> bool:
    """A directory of a group-readable repository: setgid and group-readable."""
    return bool(mode & stat.S_ISGID and mode & stat.S_IRGRP)


def file_mode_in(directory: str) -> int:
    """The mode of a file created in ``directory``: 0640 in a group-shared
    repository's directory, 0600 anywhere else."""
    try:
        return GROUP_FILE if _shared(os.stat(directory).st_mode) else PRIVATE_FILE
    except OSError:
        return PRIVATE_FILE


def dir_mode_in(directory: str) -> int:
    """The mode of a directory created in ``directory``, as ``file_mode_in``."""
    try:
        return GROUP_DIR if _shared(os.stat(directory).st_mode) else PRIVATE_DIR
    except OSError:
        return PRIVATE_DIR


def set_new_file_mode(fd: int, path: str) -> None:
    """Give the file just created at ``path`` (open as ``fd``) the mode its
    directory calls for; before any data is written, whatever the umask."""
    if owner_only(os.path.basename(path)) and _is_repository(os.path.dirname(path) or "."):
        os.fchmod(fd, PRIVATE_FILE)
        return
    os.fchmod(fd, file_mode_in(os.path.dirname(path) or "."))


def _is_repository(directory: str) -> bool:
    """A repository's top directory: the one that holds devices/ (init makes it
    before the catalog)."""
    return os.path.isdir(os.path.join(directory, "devices"))


def make_dir(path: str, access: Access | None = None) -> bool:
    """Create directory ``path`` with ``access``'s mode and group, or (None)
    with the mode its parent calls for. False: it was already there."""
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        if os.path.islink(path):
            # Followed, a planted link would let backupfs write its images
            # (and, later, remove them) wherever the link points.
            raise BackupfsError(f"{path} is a symlink; backupfs keeps its files only in real "
                                "directories of the repository (remove the link)") from None
        if os.path.isdir(path):
            return False
        raise
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if access is not None and access.gid is not None:
            os.fchown(fd, -1, access.gid)
        os.fchmod(fd, access.dir_mode if access is not None else dir_mode_in(os.path.dirname(path)))
    finally:
        os.close(fd)
    return True


def secure(root: str, access: Access) -> bool:
    """Give ``root`` and everything backupfs may have created under it the
    modes (and group) ``access`` calls for. True: something was readable by
    users ``access`` does not allow (the caller tells the user).

    Never through a symlink (each entry is opened with O_NOFOLLOW and
    changed through that descriptor), and never on another file system
    mounted inside. Symlinks, devices and the like are left alone: backupfs
    makes none.
    """
    root = os.path.realpath(root)  # the repository's own path may be a link; nothing inside is followed
    too_open = False
    root_dev = os.stat(root).st_dev

    def fail(e: OSError) -> None:
        raise e

    for dirpath, dirnames, filenames, dir_fd in os.fwalk(root, onerror=fail, follow_symlinks=False):
        try:
            too_open |= _conform(f"/proc/self/fd/{dir_fd}", os.fstat(dir_fd), access.dir_mode, access.gid)
        except OSError as e:
            raise OSError(e.errno, e.strerror, dirpath) from None
        for name in list(dirnames):
            try:
                if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev != root_dev:
                    dirnames.remove(name)  # a mount inside: not ours
            except FileNotFoundError:
                dirnames.remove(name)
        for name in filenames:
            mode = PRIVATE_FILE if dirpath == root and owner_only(name) else access.file_mode
            try:
                too_open |= _secure_file(dir_fd, name, mode, access.gid)
            except OSError as e:
                raise OSError(e.errno, e.strerror, os.path.join(dirpath, name)) from None
    return too_open


def _secure_file(dir_fd: int, name: str, mode: int, gid: int | None) -> bool:
    """``secure`` for one entry that is not a directory (regular files only)."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False  # gone meanwhile (a -shm file, say)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        # The descriptor's /proc entry is the very inode opened above, not a
        # path a symlink could redirect (fchmod refuses an O_PATH descriptor).
        return _conform(f"/proc/self/fd/{fd}", st, mode, gid)
    finally:
        os.close(fd)


def _conform(fd_path: str, st: os.stat_result, mode: int, gid: int | None) -> bool:
    """Set ``mode`` (and group ``gid``) on the inode at ``fd_path``; True if
    its group or others could read more than ``mode`` allows."""
    current = stat.S_IMODE(st.st_mode)
    wrong_group = gid is not None and st.st_gid != gid
    if wrong_group:
        os.chown(fd_path, -1, gid)  # before the chmod: a chown clears the setgid bit
    if current != mode or wrong_group:
        os.chmod(fd_path, mode)
    return bool(current & ~mode & 0o077) or bool(wrong_group and current & 0o070)
