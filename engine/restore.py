"""Writing a backup out to a file or a block device.

A regular file target is sparse: zero regions become holes, so restoring a
mostly empty 100 GiB disk writes what it holds. A block device target gets
every byte, zeros included, because it may hold old data anywhere. A file
written in place (a device file on a backupfs mount, whose bitmap records
every write) gets only the blocks that differ from the backup, so its next
incremental holds what the restore changed, not the whole disk. Reads go
through a checked view, so a damaged cluster stops the restore with its
offset instead of writing wrong data.

A target is never reached through a symlink at its last component: a file
target is replaced by a new file made beside it (O_EXCL | O_NOFOLLOW, in the
directory opened once, renamed over the target's name: whatever another user
planted there, link or file, is replaced, never written through); a block
device may be named by an administrator's symlink (/dev/VG/LV), no other
(engine/sourceid.py says which).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import secrets
import signal
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.chain import aligned_buffer
from engine.errors import BackupfsError, ErrnoError, UsageError, is_disk_full
from engine.job import Progress
from engine.pipeline import BytesLike, copy_chunks
from engine.stopsignals import STOP_SIGNALS
from engine.sourceid import BLOCK, PathRefused, SourceId, hold_path, identity_at, open_disk
from engine.units import format_size

if TYPE_CHECKING:
    from engine.catalog import DeviceRecord

CHUNK = 8 * 1024 * 1024


class RestoreError(ErrnoError):
    """A restore that failed; the message says how much of the target it wrote."""


class Target(enum.Enum):
    """How a restore writes its target (the value says it to the user)."""

    FILE = "sparse file"  # written beside it, renamed over it at the end; zeros stay holes
    BLOCK = "block device"  # written in place, every byte
    IN_PLACE = "in place"  # written in place, only the blocks that differ from the backup
    RBD_NEW = "new RBD image"  # made for the restore (engine/rbdrestore.py); zeros not written
    RBD = "RBD image, overwritten"  # an existing image, written in place; zeros written where it held data


@dataclass
class RestoreResult:
    target: str
    size: int
    written: int
    kind: Target
    target_size: int  # a block device may be larger than the backup: its tail is left as it was
    backup: str = ""  # the backup's id, as resolved from 'latest'
    identity: SourceId | None = None  # the new file a FILE restore made (it replaced the target's name)
    note: str = ""  # what else was done to the target (an RBD image resized, say)

    def summary(self, device: str, through: str = "") -> str:
        """The line a restore prints: what was written where, and what was not."""
        line = (f"restored {self.backup} of {device} to {self.target}{through} ({self.kind.value}): "
                f"{format_size(self.written)} written of {format_size(self.size)}")
        if self.target_size > self.size:
            line += (f"; {self.target} is {format_size(self.target_size)}: its last "
                     f"{format_size(self.target_size - self.size)} were left as they were")
        if self.note:
            line += f"; {self.note}"
        return line


def source_named(target: str, devices: Iterable[DeviceRecord]) -> DeviceRecord | None:
    """The device whose source ``target`` is: the same path, or another name
    (a hard link, another path) for the same file or disk. A symlink at
    ``target`` is not followed: a restore refuses it anyway."""
    path = os.path.abspath(target)
    try:
        found = SourceId.of(os.lstat(path))
    except OSError:
        found = None
    for d in devices:
        if d.source and (os.path.abspath(d.source) == path
                         or (found is not None and found in (d.identity, identity_at(d.source)))):
            return d
    return None


def _split(target: str) -> tuple[str, str]:
    """(directory, name) of a target; a name that is no file's is refused."""
    directory, base = os.path.split(os.path.abspath(target))
    if base in ("", ".", ".."):
        raise UsageError(f"restore target {target} is a directory; give a file or block device")
    return directory, base


def _open_dir(target: str, directory: str) -> int:
    """The target's directory, opened once: every later step names the
    target relative to it, so a directory switched meanwhile changes nothing."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UsageError(f"restore target {target}: directory {directory} does not exist") from None
        raise UsageError(f"restore target {target}: directory {directory}: {e.strerror}") from None


def _refuse_inside(dirfd: int, base: str, target: str, repository: str) -> None:
    """Refuse a target in the repository, told by where the opened directory
    really is (symlinks on the way resolved), not by the path's text."""
    repo = os.path.realpath(repository)
    if os.path.isdir("/proc/self/fd"):
        where = os.readlink(f"/proc/self/fd/{dirfd}")
    else:
        where = os.path.realpath(os.path.dirname(os.path.abspath(target)))
    if os.path.commonpath([os.path.join(where, base), repo]) == repo:
        raise UsageError(f"restore target {target} lies inside the repository {repository}; "
                         "that would overwrite the backups themselves")


def _link_refused(target: str, why: str = "") -> UsageError:
    return UsageError(f"restore target {target} is a symlink{why}; a restore never writes through one: "
                      "give the path of the file or block device itself")


def check_target(target: str, size: int, force: bool, repository: str | None = None) -> Target:
    """Validate a restore target and say how it is written (FILE or BLOCK)."""
    directory, base = _split(target)
    dirfd = _open_dir(target, directory)
    try:
        if repository is not None:
            _refuse_inside(dirfd, base, target, repository)
        try:
            st = os.stat(base, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return Target.FILE
    finally:
        os.close(dirfd)
    if stat.S_ISLNK(st.st_mode):
        try:
            pfd, st = hold_path(target)  # an administrator's name for a block device (/dev/VG/LV)
        except PathRefused as e:
            raise _link_refused(target, " " + e.found.removeprefix("a symlink ")) from None
        except OSError as e:
            raise _link_refused(target, f" that leads nowhere ({e.strerror})") from None
        os.close(pfd)
        if not stat.S_ISBLK(st.st_mode):
            raise _link_refused(target)
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"restore target {target} is a directory; give a file or block device")
    if stat.S_ISBLK(st.st_mode):
        fd = _open_block_device(target, os.O_RDONLY)
        try:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if dev_size < size:
            raise UsageError(f"block device {target} holds {dev_size} bytes, the backup needs {size}")
        if not force:
            raise UsageError(f"{target} is a block device; its contents would be overwritten (use --force)")
        return Target.BLOCK
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"restore target {target} is not a regular file or block device")
    if not force:
        raise UsageError(f"restore target {target} exists (use --force to overwrite it)")
    return Target.FILE


def _open_block_device(target: str, mode: int) -> int:
    """Open a block device exclusively: the kernel refuses it while a file
    system on it is mounted, or LVM, md or another program holds it so,
    and nobody can mount it while we write. Checked to be a block device
    before it is opened, reached through no symlink but an administrator's."""
    try:
        fd, found = open_disk(target, mode | os.O_EXCL)
    except PathRefused as e:
        raise UsageError(f"restore target {target} is no longer the block device it was: it is {e.found}") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UsageError(f"block device {target} is in use (a mounted file system, or held by another "
                             "program); unmount or release it first") from None
        raise
    if found.kind != BLOCK:
        os.close(fd)
        raise UsageError(f"restore target {target} is no longer the block device it was: it is a regular file")
    return fd


def check_in_place_target(target: str, size: int, force: bool, what: str) -> Target:
    """Validate a file that can only be written in place (``what`` says why)."""
    try:
        st = os.lstat(target)
    except OSError as e:
        raise UsageError(f"restore target {target}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _link_refused(target)
    actual = st.st_size
    if actual < size:
        raise UsageError(f"restore target {target} ({what}) holds {actual} bytes, the backup needs {size}")
    if not force:
        raise UsageError(f"{target} is {what}; its contents would be overwritten (use --force)")
    return Target.IN_PLACE


def restore_to(
    read: Callable[[int, memoryview], BytesLike],
    size: int,
    target: str,
    *,
    kind: Target,
    on_progress: Callable[[Progress], None] | None = None,
    repository: str | None = None,
) -> RestoreResult:
    """Copy ``size`` bytes of a backup into ``target``.

    ``read(offset, out)`` fills ``out`` with the backup's bytes at
    ``offset`` and returns them (usually ``out``); it runs a chunk or two
    ahead of the writes (engine.pipeline). ``repository``: refuse a file
    target inside it (checked again here, on the directory as opened).
    """
    # A file is written beside the target and renamed over it at the end:
    # a restore that fails half-way (a damaged cluster, a full disk) leaves
    # the old file as it was, not cut short. A block device is written in
    # place; it cannot be anything else, nor can a file written in place.
    in_place = kind is not Target.FILE
    dirfd = -1
    base = hidden = ""
    if not in_place:
        directory, base = _split(target)
        dirfd = _open_dir(target, directory)
    # Created with the stop signals held back until the try below that
    # removes the file: a Ctrl-C or kill (whose handlers raise) arriving
    # just after its creation lands inside that try, not before it.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if kind is Target.BLOCK:
            fd = _open_block_device(target, os.O_WRONLY)
        elif kind is Target.IN_PLACE:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        else:
            if repository is not None:
                _refuse_inside(dirfd, base, target, repository)
            _remove_stale_copies(dirfd, base)
            fd, hidden = _create_hidden_copy(dirfd, base)
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we live: see _remove_stale_copies
    except BaseException as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if dirfd >= 0:
            os.close(dirfd)
        if isinstance(e, OSError):
            if e.errno == errno.ELOOP:
                raise _link_refused(target) from None
            raise RestoreError(f"cannot open restore target {target}: {e.strerror}", e.errno or errno.EIO) from None
        raise
    progress = Progress(total=size, phase="restoring")
    ok = False
    made: SourceId | None = None
    target_size = os.lseek(fd, 0, os.SEEK_END) if in_place else size
    current = aligned_buffer(CHUNK) if kind is Target.IN_PLACE else None

    def fill(pos: int, out: memoryview) -> BytesLike:
        try:
            data = read(pos, out)
        except OSError as e:
            raise RestoreError(f"reading the backup at offset {pos}: {e.strerror}", e.errno or errno.EIO) from None
        if len(data) != len(out):
            raise RestoreError(f"short read of the backup at offset {pos}")
        return data

    def write(pos: int, data: BytesLike) -> None:
        view = memoryview(data)
        if kind is Target.BLOCK:
            _pwrite_all(fd, view, pos)
            progress.written += len(view)
        elif current is not None:
            progress.written += _write_changed(fd, view, pos, memoryview(current)[: len(view)])
        else:
            progress.written += _write_sparse(fd, view, pos)
        progress.done = pos + len(view)
        if on_progress is not None:
            on_progress(progress)

    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop held back lands here
        if not in_place:
            _keep_mode(fd, dirfd, base)
        chunks = ((pos, min(CHUNK, size - pos)) for pos in range(0, size, CHUNK))
        copy_chunks(chunks, fill, write, CHUNK)
        if not in_place:
            os.ftruncate(fd, size)
        os.fsync(fd)
        if not in_place:
            made = SourceId.of(os.fstat(fd))
            os.replace(hidden, base, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            os.fsync(dirfd)
        ok = True
    except OSError as e:
        err = errno.ENOSPC if is_disk_full(e.errno) else (e.errno or errno.EIO)
        raise RestoreError(f"writing {target}: {e.strerror}{_partly(kind, progress, target)}", err) from None
    except BackupfsError as e:  # the backup could not be read
        note = _partly(kind, progress, target)
        if not note:
            raise
        raise RestoreError(f"{e}{note}", getattr(e, "errno", errno.EIO)) from None
    finally:
        try:
            os.close(fd)
        except OSError as e:
            # A file on a mount whose daemon died fails its close too; the
            # error already on its way says more. With none, this is it.
            if ok:
                raise RestoreError(f"closing {target}: {e.strerror}", e.errno or errno.EIO) from None
        finally:
            if not in_place:
                if not ok:
                    try:
                        os.unlink(hidden, dir_fd=dirfd)
                    except OSError:
                        pass
                os.close(dirfd)
    return RestoreResult(target, size, progress.written, kind, target_size, identity=made)


def _keep_mode(fd: int, dirfd: int, base: str) -> None:
    """Give the new file the mode of the file it replaces, if that is ours:
    one another user made (planted in /tmp, say) must not make the restored
    disk readable by all. Otherwise it stays 0600."""
    try:
        st = os.stat(base, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode))


def _hidden_names(base: str) -> Iterator[str]:
    for _ in range(100):
        yield f".{base}.{secrets.token_hex(4)}.restoring"


def _create_hidden_copy(dirfd: int, base: str, names: Iterable[str] | None = None) -> tuple[int, str]:
    """(descriptor, name) of a new file beside the target, made by us.

    O_EXCL | O_NOFOLLOW: a name that exists (a symlink or file another
    user planted where the directory lets them) is never opened, only
    passed over for the next.
    """
    for name in names if names is not None else _hidden_names(base):
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dirfd)
        except FileExistsError:
            continue
        return fd, name
    raise FileExistsError(errno.EEXIST, "no free name for the hidden copy beside it")


def _partly(kind: Target, progress: Progress, target: str) -> str:
    """What a failed restore in place left: the user must know the target is now neither."""
    if kind is Target.FILE:
        return ""
    if progress.done == 0:  # the first chunk may be partly written
        return f"; {target} may now hold part of the backup: restore again to finish"
    return (f"; {target} now holds the backup's first {format_size(progress.done)} and its "
            "old contents after that: restore again to finish")


def _remove_stale_copies(dirfd: int, base: str) -> None:
    """Remove what killed restores to ``base`` (in the directory ``dirfd``) left beside it.

    A restore killed outright (SIGKILL, the OOM killer, a power cut) leaves
    its hidden copy, up to the disk's size. A live restore holds an flock on
    its copy, so a copy that can be locked has no restore behind it. Only
    our own regular files: never one another user made, nor a link.
    """
    prefix = f".{base}."
    try:
        names = [n for n in os.listdir(dirfd) if n.startswith(prefix) and n.endswith(".restoring")]
    except OSError:
        return
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(name, dir_fd=dirfd)
        except OSError:
            continue  # in use by a live restore, or not ours to remove
        finally:
            os.close(fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _write_changed(fd: int, view: memoryview, offset: int, current: memoryview, block: int = 64 * 1024) -> int:
    """Write the 64 KiB blocks of ``view`` that differ from what the file holds there."""
    n = len(view)
    got = 0
    while got < n:
        k = os.preadv(fd, [current[got:]], offset + got)
        if k == 0:
            break  # cannot happen for a file checked to be large enough; then everything is written
        got += k
    nblocks = -(-n // block)
    differs = np.ones(nblocks, dtype=bool)
    full = min(got, n) // block
    if full:
        new = np.frombuffer(view[: full * block], dtype=np.uint64).reshape(full, block // 8)
        old = np.frombuffer(current[: full * block], dtype=np.uint64).reshape(full, block // 8)
        differs[:full] = (new != old).any(axis=1)
    if got == n and n % block:
        differs[-1] = bytes(view[full * block :]) != bytes(current[full * block : n])
    return _write_blocks(fd, view, offset, differs, block)


def _write_blocks(fd: int, view: memoryview, offset: int, wanted: np.ndarray, block: int) -> int:
    """Write the ``block``-sized pieces of ``view`` that ``wanted`` marks, a
    run of them at a time; the bytes written."""
    n = len(view)
    written = 0
    i = 0
    while i < len(wanted):
        if not wanted[i]:
            i += 1
            continue
        j = i
        while j < len(wanted) and wanted[j]:
            j += 1
        a, b = i * block, min(j * block, n)
        _pwrite_all(fd, view[a:b], offset + a)
        written += b - a
        i = j
    return written


def _write_sparse(fd: int, view: memoryview, offset: int, block: int = 64 * 1024) -> int:
    """Write the non-zero 64 KiB blocks of ``view``; zero blocks stay holes."""
    n = len(view)
    full = n // block
    nonzero = np.ones(full + (1 if n % block else 0), dtype=bool)
    if full:
        words = np.frombuffer(view[: full * block], dtype=np.uint64)
        nonzero[:full] = words.reshape(full, block // 8).any(axis=1)
    return _write_blocks(fd, view, offset, nonzero, block)
