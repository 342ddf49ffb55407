"""`backupfs restore ... DIR --include PATH`: guest files and trees copied into a host directory.

The guest's bytes are hostile input and DIR may hold what another user
left there, so nothing here ever resolves a path through the host: every
file is made relative to an open directory descriptor, every directory is
entered with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink on the way is refused
with one line naming it), and a file, link or node is first made under a
temporary name in its final directory and only then given its name, so a
failure or Ctrl-C midway never leaves a half-written file under a final
name. An existing name is kept unless ``force``; with ``force`` a file or a
symlink there is replaced (the name itself, never what a link points to),
and a directory is never replaced.

Layout: the path below the volume is kept, as tar keeps member names:
``--include p2/etc/fstab`` makes ``DIR/etc/fstab``, ``--include p2`` puts
the volume's root entries in DIR. Directories this run creates get the
guest's mode, owner (as root) and times once their contents are written;
directories that were already there are left as they were.

What the guest picks must not become a way to root on the host, where
this runs as root: a file's setuid and setgid bits are not kept (a
guest's setuid-root program in DIR would be root for every user who can
reach DIR), and device nodes are not made (their numbers are the guest's:
a 0666 node of the host's disk or /dev/mem). Each is noted. FIFOs are.
``--keep-special`` (root only: restoring a system tree into a directory
only root can reach) keeps the bits and makes the nodes, as tar does.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.errors import BackupfsError
from engine.guest.guestfs import GuestEntry
from engine.guest.reader import GuestDamaged
from engine.guest.volume import GuestPath, Volume, show_path
from engine.text import escape

from backupfs.guestdump import PIECE
from backupfs.guestwalk import Target, children, hard_link_key, shown

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A directory being filled: its fd, whether this run made it, its path, its entry, what is left of it.
Frame = tuple[int, bool, GuestPath, GuestEntry, Iterator[tuple[bytes, GuestEntry]]]
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV})
SET_ID_BITS = stat.S_ISUID | stat.S_ISGID


class RestoreRefused(BackupfsError):
    """A name in DIR that this restore will not write through or over."""


@dataclass
class Counts:
    files: int = 0
    dirs: int = 0
    links: int = 0
    others: int = 0
    bytes: int = 0
    unreadable: int = 0  # entries the guest's filesystem could not give
    unwritable: int = 0  # entries whose names DIR's filesystem cannot hold (too long)

    def summary(self) -> str:
        parts = [_counted(self.files, "file", "files") + f" ({self.bytes} bytes)",
                 _counted(self.dirs, "directory", "directories"), _counted(self.links, "symlink", "symlinks")]
        if self.others:
            parts.append(_counted(self.others, "other entry", "other entries"))
        return ", ".join(parts)


def _counted(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def open_target_dir(path: str) -> int:
    """DIR, opened: it must exist and be a real directory (a symlink is refused)."""
    try:
        return os.open(path, DIR_FLAGS)
    except FileNotFoundError:
        raise RestoreRefused(f"{escape(path)}: no such directory (create it first)") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            if _is_symlink(path):
                raise RestoreRefused(f"{escape(path)} is a symlink; give the real directory") from None
            raise RestoreRefused(f"{escape(path)} is not a directory") from None
        raise BackupfsError(f"{escape(path)}: {e.strerror}") from None


def _is_symlink(name: str | bytes, dir_fd: int | None = None) -> bool:
    """Why opening a directory failed: O_NOFOLLOW | O_DIRECTORY on a symlink
    says ENOTDIR (not ELOOP) on Linux, so look at the name itself."""
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


class Restorer:
    """Copies guest entries below ``root_fd`` (DIR); ``note`` hears what was skipped."""

    def __init__(self, root_fd: int, root_text: str, force: bool, note: Callable[[str], None],
                 keep_special: bool = False) -> None:
        self.root_fd = root_fd
        self.keep_special = keep_special
        self.root_text = escape(root_text)
        self.force = force
        self.note = note
        self.as_root = os.geteuid() == 0
        self.counts = Counts()
        self._first_names: dict[tuple[str, object], GuestPath] = {}
        self._made_parents: list[tuple[GuestPath, GuestEntry, Volume]] = []
        self._serial = 0
        # A guest's name may be longer than DIR's filesystem takes (NTFS and
        # FAT count 255 UTF-16 units: up to 765 bytes of UTF-8); such an
        # entry is skipped and noted, as tar does, not the end of the run.
        try:
            self.name_max = os.fpathconf(root_fd, "PC_NAME_MAX")
        except OSError:
            self.name_max = 255

    def where(self, path: GuestPath) -> str:
        """A path in DIR as text for a message."""
        return self.root_text.rstrip("/") + "/" + shown(path) if path else self.root_text

    # -- directories ------------------------------------------------------

    def _enter(self, parent_fd: int, path: GuestPath) -> tuple[int, bool]:
        """Open (making it if missing) the directory ``path[-1]`` in ``parent_fd``;
        whether this run made it."""
        name = path[-1]
        made = False
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            made = True
        except FileExistsError:
            pass
        except OSError as e:
            raise BackupfsError(f"{self.where(path)}: cannot make the directory: {e.strerror}") from None
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd), made
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                if _is_symlink(name, parent_fd):
                    raise RestoreRefused(f"{self.where(path)} is a symlink; refusing to write through it") from None
                raise RestoreRefused(f"{self.where(path)} exists and is not a directory") from None
            raise BackupfsError(f"{self.where(path)}: {e.strerror}") from None

    def _open_parents(self, volume: Volume, path: GuestPath) -> int:
        """The directory that will hold ``path``, its missing parents made."""
        fd = os.dup(self.root_fd)
        try:
            for depth in range(1, len(path)):
                inner, made = self._enter(fd, path[:depth])
                os.close(fd)
                fd = inner
                if made:
                    self._made_parents.append((path[:depth], volume.entry(path[:depth]), volume))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _finish_dir(self, fd: int, volume: Volume, path: GuestPath, entry: GuestEntry) -> None:
        """Give a directory this run made the guest's owner, mode, xattrs and times."""
        self._set_xattrs(fd, volume, path)
        if self.as_root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, stat.S_IMODE(entry.mode))
        os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))

    def finish(self) -> None:
        """Directories made above included paths: their guest metadata, deepest first."""
        for path, entry, volume in sorted(self._made_parents, key=lambda p: -len(p[0])):
            fd = self._open_existing(path)
            try:
                self._finish_dir(fd, volume, path, entry)
            finally:
                os.close(fd)
        self._made_parents.clear()

    # -- one include ------------------------------------------------------

    def restore(self, target: Target) -> None:
        """One ``--include``: the entry at ``target`` and, for a directory, all below it.

        What the guest's filesystem cannot give (a damaged directory or
        file) is skipped with a note and counted, as tar and rsync carry
        on: one bad inode should not cost the rest of a restore.
        """
        volume, path, entry = target.volume, target.path, target.entry
        if not path:  # a volume's root: its entries go straight into DIR, whose metadata stays
            pending = self._listing(volume, path)
            if pending is not None:
                self._tree(volume, (os.dup(self.root_fd), False, path, entry, pending))
            return
        parent_fd = self._open_parents(volume, path)
        try:
            if entry.is_dir:
                frame = self._dir(parent_fd, volume, path, entry)
                if frame is not None:
                    self._tree(volume, frame)
            else:
                self._leaf_or_skip(parent_fd, volume, path, entry)
        finally:
            os.close(parent_fd)

    def _fits(self, path: GuestPath) -> bool:
        """Whether DIR's filesystem can hold the entry's name; if not, noted and counted."""
        if len(path[-1]) <= self.name_max:
            return True
        self.counts.unwritable += 1
        self.note(f"{self.where(path)}: a name of {len(path[-1])} bytes, longer than the {self.name_max} "
                  f"that {self.root_text}'s filesystem takes; not restored")
        return False

    def _unreadable(self, error: GuestDamaged) -> None:
        self.counts.unreadable += 1
        self.note(f"{error}; not restored")

    def _listing(self, volume: Volume, path: GuestPath) -> Iterator[tuple[bytes, GuestEntry]] | None:
        try:
            return children(volume, path)
        except GuestDamaged as e:
            self._unreadable(e)
            return None

    def _dir(self, parent_fd: int, volume: Volume, path: GuestPath, entry: GuestEntry) -> Frame | None:
        """A directory to fill: listed before it is made, so an unreadable one is not made."""
        if not self._fits(path):
            return None
        pending = self._listing(volume, path)
        if pending is None:
            return None
        fd, made = self._enter(parent_fd, path)
        self.counts.dirs += made
        return fd, made, path, entry, pending

    def _tree(self, volume: Volume, top: Frame) -> None:
        """A directory's contents, depth first with one open descriptor per level;
        each directory made gets its metadata when its last entry is written."""
        stack = [top]
        try:
            while stack:
                fd, made, path, entry, pending = stack[-1]
                step = next(pending, None)
                if step is None:
                    stack.pop()
                    try:
                        if made:
                            self._finish_dir(fd, volume, path, entry)
                    finally:
                        os.close(fd)
                    continue
                name, child = step
                child_path = path + (name,)
                if child.is_dir:
                    frame = self._dir(fd, volume, child_path, child)
                    if frame is not None:
                        stack.append(frame)
                else:
                    self._leaf_or_skip(fd, volume, child_path, child)
        finally:
            for frame in stack:
                os.close(frame[0])

    # -- files, links, nodes ----------------------------------------------

    def _leaf_or_skip(self, dir_fd: int, volume: Volume, path: GuestPath, entry: GuestEntry) -> None:
        if not self._fits(path):
            return
        try:
            self._leaf(dir_fd, volume, path, entry)
        except GuestDamaged as e:
            self._unreadable(e)

    def _leaf(self, dir_fd: int, volume: Volume, path: GuestPath, entry: GuestEntry) -> None:
        """Anything but a directory: made under a temporary name, then placed."""
        self._check_free(dir_fd, path)
        key = hard_link_key(volume, entry)
        first = self._first_names.get(key) if key is not None else None
        if first is not None:
            self._place(dir_fd, path, lambda tmp: self._link_to(first, dir_fd, tmp))
            return
        if entry.is_file:
            self._place(dir_fd, path, lambda tmp: self._write_file(dir_fd, tmp, volume, path, entry))
            self.counts.files += 1
        elif entry.is_link:
            target = self._link_target(volume, path)
            self._place(dir_fd, path, lambda tmp: self._make_symlink(dir_fd, tmp, target, entry))
            self.counts.links += 1
        elif stat.S_ISFIFO(entry.mode):
            self._place(dir_fd, path, lambda tmp: self._make_fifo(dir_fd, tmp, entry))
            self.counts.others += 1
        elif self.keep_special and self.as_root and (stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode)):
            self._place(dir_fd, path, lambda tmp: self._make_node(dir_fd, tmp, entry))
            self.counts.others += 1
        else:
            what = "a socket" if stat.S_ISSOCK(entry.mode) else "a device node (its numbers are the guest's)"
            self.note(f"{self.where(path)}: {what}; skipped")
            return
        if key is not None:
            self._first_names[key] = path

    @staticmethod
    def _link_target(volume: Volume, path: GuestPath) -> bytes:
        """A symlink's target, if a host symlink can hold it: a crafted one that
        is empty or holds NUL is as unreadable as a damaged one (skipped, noted)."""
        target = volume.readlink(path)
        if not target or b"\0" in target:
            raise GuestDamaged(f"{volume.name}: {show_path(path)}: a symlink target no host symlink can hold "
                               f"('{escape(target.decode('utf-8', 'surrogateescape'))}')")
        return target

    def _check_free(self, dir_fd: int, path: GuestPath) -> None:
        """Refuse a name that exists, unless ``force`` and it is a file or a link."""
        try:
            st = os.lstat(path[-1], dir_fd=dir_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise RestoreRefused(f"{self.where(path)} exists and is a directory; not replacing it")
        if not self.force:
            raise RestoreRefused(f"{self.where(path)} exists; give --force to replace it")

    def _place(self, dir_fd: int, path: GuestPath, make: Callable[[bytes], None]) -> None:
        """``make`` the entry under a temporary name in ``dir_fd``, then give it its name:
        with ``force`` by rename (over what is there), else by link (never over anything)."""
        self._serial += 1
        tmp = b".%s.backupfs-%d-%d" % (path[-1][:100], os.getpid(), self._serial)
        try:
            make(tmp)
            if self.force or not self._link_in_place(dir_fd, tmp, path):
                if not self.force:
                    self._check_free(dir_fd, path)
                os.rename(tmp, path[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise

    def _link_in_place(self, dir_fd: int, tmp: bytes, path: GuestPath) -> bool:
        """Give ``tmp`` its final name without replacing anything; False where
        the directory's filesystem has no hard links (the caller renames)."""
        try:
            os.link(tmp, path[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise RestoreRefused(f"{self.where(path)} exists; give --force to replace it") from None
        except OSError as e:
            if e.errno in NO_HARD_LINKS:
                return False
            raise
        os.unlink(tmp, dir_fd=dir_fd)
        return True

    def _write_file(self, dir_fd: int, tmp: bytes, volume: Volume, path: GuestPath, entry: GuestEntry) -> None:
        """The file's bytes into a new file; its holes, and runs of zeros, stay holes
        (only the ranges that hold data are read: engine/guest/guestfs.py data_spans)."""
        data = volume.data(path)
        fd = os.open(tmp, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            for start, end in data.data_spans():
                for offset in range(start, end, PIECE):
                    piece = volume.read_data(data, offset, min(PIECE, end - offset))
                    if piece.count(0) == len(piece):
                        continue  # zeros: ftruncate below makes the size
                    view = memoryview(piece)
                    pos = offset
                    while view:
                        n = os.pwrite(fd, view, pos)
                        view, pos = view[n:], pos + n
            os.ftruncate(fd, data.size)
            self.counts.bytes += data.size
            self._set_xattrs(fd, volume, path)
            if self.as_root:
                os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, self._file_mode(path, entry))
            os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _file_mode(self, path: GuestPath, entry: GuestEntry) -> int:
        """The guest's permission bits, without setuid and setgid (noted) unless --keep-special."""
        mode = stat.S_IMODE(entry.mode)
        if self.keep_special and self.as_root:
            return mode
        if mode & SET_ID_BITS:
            self.note(f"{self.where(path)}: the guest's setuid/setgid bits not kept (mode "
                      f"{mode & ~SET_ID_BITS:o}, not {mode:o})")
        return mode & ~SET_ID_BITS

    def _make_symlink(self, dir_fd: int, tmp: bytes, target: bytes, entry: GuestEntry) -> None:
        os.symlink(target, tmp, dir_fd=dir_fd)
        self._owner_and_times(dir_fd, tmp, entry)

    def _make_node(self, dir_fd: int, tmp: bytes, entry: GuestEntry) -> None:
        """A guest's device node, made with its numbers (--keep-special, as root), private
        until its owner and mode are the guest's."""
        os.mknod(tmp, stat.S_IFMT(entry.mode) | 0o600, entry.rdev, dir_fd=dir_fd)
        self._owner_and_times(dir_fd, tmp, entry)
        os.chmod(tmp, stat.S_IMODE(entry.mode), dir_fd=dir_fd, follow_symlinks=False)

    def _make_fifo(self, dir_fd: int, tmp: bytes, entry: GuestEntry) -> None:
        os.mkfifo(tmp, 0o600, dir_fd=dir_fd)
        self._owner_and_times(dir_fd, tmp, entry)
        os.chmod(tmp, stat.S_IMODE(entry.mode) & ~SET_ID_BITS, dir_fd=dir_fd)  # a FIFO we just made, not a link

    def _owner_and_times(self, dir_fd: int, name: bytes, entry: GuestEntry) -> None:
        if self.as_root:
            os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    def _link_to(self, first: GuestPath, dir_fd: int, tmp: bytes) -> None:
        """A second name of an inode restored earlier in this run: a hard link to it."""
        first_dir = self._open_existing(first[:-1])
        try:
            os.link(first[-1], tmp, src_dir_fd=first_dir, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(first_dir)

    def _open_existing(self, path: GuestPath) -> int:
        """A directory below DIR, entered one name at a time without following links."""
        fd = os.dup(self.root_fd)
        try:
            for depth in range(1, len(path) + 1):
                inner = os.open(path[depth - 1], DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
        except OSError as e:
            os.close(fd)
            raise BackupfsError(f"{self.where(path)}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _set_xattrs(self, fd: int, volume: Volume, path: GuestPath) -> None:
        """The guest's ``user.*`` attributes, where DIR's filesystem takes them."""
        try:
            xattrs = volume.xattrs(path)
        except GuestDamaged as e:
            self.note(f"{e}; extended attributes not kept")
            return
        for name, value in xattrs.items():
            try:
                os.setxattr(fd, name, value)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    self.note(f"{self.where(path)}: extended attributes not kept ({e.strerror})")
                    return
                raise
