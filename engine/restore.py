"""Writing a backup out to a file or a block device.

A regular file target is sparse: zero regions become holes, so restoring a
mostly empty 100 GiB disk writes what it holds. A block device target gets
every byte, zeros included, because it may hold old data anywhere. A file
written in place (a device file on a backupfs mount, whose bitmap records
every write) gets only the blocks that differ from the backup, so its next
incremental holds what the restore changed, not the whole disk. Reads go
through a checked view, so a damaged cluster stops the restore with its
offset instead of writing wrong data.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import signal
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.chain import aligned_buffer
from engine.errors import BackupfsError, UsageError
from engine.fsutil import fsync_dir
from engine.job import Progress
from engine.pipeline import BytesLike, copy_chunks
from engine.stopsignals import STOP_SIGNALS
from engine.units import format_size

CHUNK = 8 * 1024 * 1024


class RestoreError(BackupfsError):
    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class Target(enum.Enum):
    """How a restore writes its target (the value says it to the user)."""

    FILE = "sparse file"  # written beside it, renamed over it at the end; zeros stay holes
    BLOCK = "block device"  # written in place, every byte
    IN_PLACE = "in place"  # written in place, only the blocks that differ from the backup


@dataclass
class RestoreResult:
    target: str
    size: int
    written: int
    kind: Target
    target_size: int  # a block device may be larger than the backup: its tail is left as it was
    backup: str = ""  # the backup's id, as resolved from 'latest'

    def summary(self, device: str, through: str = "") -> str:
        """The line a restore prints: what was written where, and what was not."""
        line = (f"restored {self.backup} of {device} to {self.target}{through} ({self.kind.value}): "
                f"{format_size(self.written)} written of {format_size(self.size)}")
        if self.target_size > self.size:
            line += (f"; {self.target} is {format_size(self.target_size)}: its last "
                     f"{format_size(self.target_size - self.size)} were left as they were")
        return line


def check_target(target: str, size: int, force: bool, repository: str | None = None) -> Target:
    """Validate a restore target and say how it is written (FILE or BLOCK)."""
    if repository is not None:
        repo = os.path.realpath(repository)
        if os.path.commonpath([os.path.realpath(target), repo]) == repo:
            raise UsageError(f"restore target {target} lies inside the repository {repository}; "
                             "that would overwrite the backups themselves")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise UsageError(f"restore target {target}: directory {parent} does not exist") from None
        return Target.FILE
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
    and nobody can mount it while we write."""
    try:
        return os.open(target, mode | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UsageError(f"block device {target} is in use (a mounted file system, or held by another "
                             "program); unmount or release it first") from None
        raise


def check_in_place_target(target: str, size: int, force: bool, what: str) -> Target:
    """Validate a file that can only be written in place (``what`` says why)."""
    try:
        actual = os.stat(target).st_size
    except OSError as e:
        raise UsageError(f"restore target {target}: {e.strerror}") from None
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
) -> RestoreResult:
    """Copy ``size`` bytes of a backup into ``target``.

    ``read(offset, out)`` fills ``out`` with the backup's bytes at
    ``offset`` and returns them (usually ``out``); it runs a chunk or two
    ahead of the writes (engine.pipeline).
    """
    # A file is written beside the target and renamed over it at the end:
    # a restore that fails half-way (a damaged cluster, a full disk) leaves
    # the old file as it was, not cut short. A block device is written in
    # place; it cannot be anything else, nor can a file written in place.
    in_place = kind is not Target.FILE
    if not in_place:
        target = os.path.realpath(target)  # through a symlink: replace the file, not the link
    directory = os.path.dirname(target)
    # Created with the stop signals held back until the try below that
    # removes the file: a Ctrl-C or kill (whose handlers raise) arriving
    # just after its creation lands inside that try, not before it.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if kind is Target.BLOCK:
            fd, written_path = _open_block_device(target, os.O_WRONLY), target
        elif kind is Target.IN_PLACE:
            fd, written_path = os.open(target, os.O_RDWR | os.O_CLOEXEC), target
        else:
            _remove_stale_copies(target)
            fd, written_path = tempfile.mkstemp(
                prefix=f".{os.path.basename(target)}.", suffix=".restoring", dir=directory
            )
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we live: see _remove_stale_copies
    except BaseException as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if isinstance(e, OSError):
            raise RestoreError(f"cannot open restore target {target}: {e.strerror}", e.errno or errno.EIO) from None
        raise
    progress = Progress(total=size, phase="restoring")
    ok = False
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
            try:
                os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))  # keep an overwritten file's mode
            except FileNotFoundError:
                pass
        chunks = ((pos, min(CHUNK, size - pos)) for pos in range(0, size, CHUNK))
        copy_chunks(chunks, fill, write, CHUNK)
        if not in_place:
            os.ftruncate(fd, size)
        os.fsync(fd)
        if not in_place:
            os.replace(written_path, target)
            fsync_dir(directory)
        ok = True
    except OSError as e:
        err = errno.ENOSPC if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.errno or errno.EIO)
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
            if not ok and not in_place:
                try:
                    os.unlink(written_path)
                except OSError:
                    pass
    return RestoreResult(target, size, progress.written, kind, target_size)


def _partly(kind: Target, progress: Progress, target: str) -> str:
    """What a failed restore in place left: the user must know the target is now neither."""
    if kind is Target.FILE:
        return ""
    if progress.done == 0:  # the first chunk may be partly written
        return f"; {target} may now hold part of the backup: restore again to finish"
    return (f"; {target} now holds the backup's first {format_size(progress.done)} and its "
            "old contents after that: restore again to finish")


def _remove_stale_copies(target: str) -> None:
    """Remove what killed restores to ``target`` left beside it.

    A restore killed outright (SIGKILL, the OOM killer, a power cut) leaves
    its hidden copy, up to the disk's size. A live restore holds an flock on
    its copy, so a copy that can be locked has no restore behind it.
    """
    directory, base = os.path.split(target)
    prefix = f".{base}."
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".restoring")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
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
