"""Writing a backup into an RBD image (``restore REPO NAME ID rbd:POOL/IMAGE``).

What a restore into a file or block device does (engine/restore.py), done
the way an RBD image wants it:

- a missing image is made under a hidden name beside it
  (``.IMAGE.<hex>.restoring``, the backup's size), written, then renamed to
  its name: a restore that fails, or is killed, never leaves an image that
  looks restored. Zero regions of the backup are not written at all, so the
  new image is as sparse as the backup. A killed restore's hidden image is
  removed by the next restore to the same name (one with no watcher: a
  live restore has its image open, which is a watch);
- an existing image of the backup's size that no other client has open
  is written in place; one of another size, or one a client has open (a
  watch: a running VM, a kernel mapping, a mount), only with ``--force``
  (the issue's contract: "refused if it exists and is in use or has a
  different size, unless --force"), which then says what it did. While written
  it holds RBD's exclusive lock, so a client that opens it meanwhile
  cannot write into the middle of the restore. Its size is made the
  backup's. Zero regions are written as zeros (write_zeroes: a discard
  under 64 KiB does nothing in RBD) where the image holds data, and left
  alone where it holds none;
- data goes out as librbd aio writes, several in flight and at most
  ``IN_FLIGHT_BYTES`` of them (memory stays bounded), each within one
  RADOS object, while the next chunk of the backup is read; then a flush.

Every call to the cluster is bounded in time (engine/ceph.py), and every
error is one line naming the image and, for a write, the offset.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from bitarray import bitarray

from engine.catalog import DeviceRecord
from engine.ceph import CephError, Cluster, RbdSpec, bindings, describe_error, from_record, is_rbd
from engine.errors import BackupfsError, UsageError
from engine.job import Progress
from engine.pipeline import BytesLike, copy_chunks
from engine.rbddevice import rbd_identity
from engine.rbdimage import RbdImage
from engine.restore import RestoreError, RestoreResult, Target
from engine.sourceid import SourceId
from engine.stopsignals import STOP_SIGNALS, no_stops_in_new_threads
from engine.units import format_size

# Bytes read from the backup at a time (and held per buffer of the reader).
CHUNK = 8 * 1024 * 1024
# What is checked for zeros at a time: a block with any data is written whole.
BLOCK = 64 * 1024
# aio writes outstanding at most: bytes (the memory they hold) and requests.
IN_FLIGHT_BYTES = 64 * 1024 * 1024
IN_FLIGHT_OPS = 16

# The watcher a client that died keeps until the OSDs time it out.
_WATCH_TIMEOUT = "30 s"

# What the caller checks once the target is known, before a byte is written:
# the image (None: it will be made) and its identity. It may refuse (raise).
Claim = Callable[[RbdImage | None, SourceId | None], None]


def hidden_name(image: str, tag: str | None = None) -> str:
    """The name a new image is written under until it is complete."""
    return f".{image}.{tag or secrets.token_hex(4)}.restoring"


def _hidden_re(image: str) -> re.Pattern[str]:
    return re.compile(re.escape(f".{image}.") + r"[0-9a-f]{8}\.restoring")


def rbd_source_named(spec: RbdSpec, identity: SourceId | None,
                     devices: Iterable[DeviceRecord]) -> DeviceRecord | None:
    """The device whose source the image is: the same image (its pool and
    id), or the same name in the same cluster configuration (the image
    a device is bound to, even when it is missing or was made anew)."""
    for d in devices:
        if not d.source or not is_rbd(d.source):
            continue
        if identity is not None and d.identity == identity:
            return d
        if d.source == spec.source:
            try:
                held = from_record(d.source, d.ceph)
            except CephError:
                continue
            if held.conf == spec.conf:
                return d
    return None


class _AioWriter:
    """librbd aio writes to one image, a bounded number in flight.

    Completions arrive on librbd's threads: they only count and record,
    never raise. The first failure (the lowest offset that failed) stops
    further writes; ``drain`` waits for what is still in flight, whose
    buffers librbd holds until then.
    """

    def __init__(self, image: RbdImage, max_bytes: int | None = None, max_ops: int | None = None) -> None:
        self.image = image
        self.max_bytes = max_bytes or IN_FLIGHT_BYTES
        self.max_ops = max_ops or IN_FLIGHT_OPS
        self._cond = threading.Condition()
        self._bytes = 0
        self._ops = 0
        self.failed: tuple[int, str, int] | None = None  # (offset, what went wrong, errno)
        self.started = 0  # requests started

    def _fail(self, offset: int, text: str, code: int) -> None:
        with self._cond:
            if self.failed is None or offset < self.failed[0]:
                self.failed = (offset, text, code)
            self._cond.notify_all()

    def check(self) -> None:
        """Raise the first failure as one line naming the image and offset."""
        if self.failed is not None:
            offset, text, code = self.failed
            raise CephError(f"{self.image.spec.source}: writing at offset {offset}: {text}", code)

    def _start(self, offset: int, held: int, what: str, call: Callable[[Callable[[Any], None]], Any]) -> None:
        with self._cond:
            while self.failed is None and self._ops and (
                    self._ops >= self.max_ops or self._bytes + held > self.max_bytes):
                self._cond.wait()
            if self.failed is not None:
                return
            self._ops += 1
            self._bytes += held
            self.started += 1

        def done(completion: Any) -> None:
            try:
                rv = completion.get_return_value()
                if rv < 0:
                    self._fail(offset, f"{what}: {_strerror(-rv)}", -rv)
            except BaseException as e:  # noqa: BLE001 - librbd's thread: never raise into it
                self._fail(offset, f"{what}: {e or type(e).__name__}", errno.EIO)
            finally:
                with self._cond:
                    self._ops -= 1
                    self._bytes -= held
                    self._cond.notify_all()

        _, rbd = bindings()
        try:
            call(done)
        except rbd.Error as e:  # not started: count it back, stop
            text, code = describe_error(e)
            with self._cond:
                self._ops -= 1
                self._bytes -= held
            self._fail(offset, f"{what}: {text}", code)

    def write(self, offset: int, data: bytes) -> None:
        """Start writing ``data`` at ``offset`` (librbd keeps ``data`` until done)."""
        self._start(offset, len(data), "writing",
                    lambda cb: self.image.image.aio_write(data, offset, cb))

    def zero(self, offset: int, length: int) -> None:
        """Start writing ``length`` zeros at ``offset`` (no buffer: counts as none)."""
        self._start(offset, 0, "writing zeros",
                    lambda cb: self.image.image.aio_write_zeroes(offset, length, cb))

    def drain(self) -> None:
        """Wait until nothing is in flight."""
        with self._cond:
            while self._ops:
                self._cond.wait()


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


def _runs(marks: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in ``marks``."""
    if not marks.any():
        return []
    padded = np.concatenate(([False], marks, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _nonzero_blocks(view: memoryview) -> np.ndarray:
    """One flag a BLOCK of ``view``: whether it holds anything but zeros."""
    n = len(view)
    full = n // BLOCK
    flags = np.ones(full + (1 if n % BLOCK else 0), dtype=bool)
    if full:
        words = np.frombuffer(view[: full * BLOCK], dtype=np.uint64)
        flags[:full] = words.reshape(full, BLOCK // 8).any(axis=1)
    if n % BLOCK:
        flags[-1] = any(view[full * BLOCK:])
    return flags


class _Restore:
    """One restore into ``spec``: checked, then written, then finished or undone."""

    def __init__(self, spec: RbdSpec, size: int, force: bool, claim: Claim | None) -> None:
        self.spec = spec
        self.size = size
        self.force = force
        self.claim = claim
        self.cluster: Cluster | None = None
        self.image: RbdImage | None = None
        self.hidden: str | None = None  # the new image's name until it is renamed to its own
        self.existed = False
        self.locked = False
        self.notes: list[str] = []
        self.allocated: bitarray | None = None  # an existing image: where it holds data
        self.object_size = 4 * 1024 * 1024

    # -- before a byte is written ---------------------------------------------------

    def open(self) -> None:
        """Connect, find the image, refuse what must be refused, make ready to write."""
        _, rbd = bindings()
        with no_stops_in_new_threads():  # librados' threads must not take a Ctrl-C
            self.cluster = Cluster(self.spec)
        self._remove_stale()
        try:
            image = RbdImage(self.cluster)
        except CephError as e:
            if e.errno != errno.ENOENT:
                raise
            if self.claim is not None:
                self.claim(None, None)
            return
        self.image = image
        self.existed = True
        others = self._watchers(image)
        if others and not self.force:
            raise UsageError(
                f"{self.spec.source} is in use: {len(others)} client(s) have it open ({', '.join(others)}): "
                "a running VM, a kernel mapping (rbd map) or a backupfs mount; stop, unmap or unmount it "
                f"first (a client that died holds it for up to {_WATCH_TIMEOUT}), or restore anyway with "
                "--force")
        if others:
            self.notes.append(f"written while {len(others)} other client(s) had it open ({', '.join(others)})")
        if self.claim is not None:
            self.claim(image, rbd_identity(self.cluster, image))
        actual = image.size()
        if actual != self.size and not self.force:
            raise UsageError(
                f"{self.spec.source} exists and is {format_size(actual)} ({actual} bytes), the backup "
                f"is {format_size(self.size)} ({self.size} bytes); --force resizes it to the backup's "
                "size and overwrites it")
        self._lock(rbd)
        if actual != self.size:
            image._call(f"resizing it to {self.size} bytes", image.image.resize, self.size)
            self.notes.append(f"resized from {format_size(actual)} to {format_size(self.size)}")
        self.allocated = image.allocated_units(BLOCK, self.size)
        self.object_size = image.object_size()

    def _watchers(self, image: RbdImage) -> list[str]:
        """The clients other than this restore's connection that have the image open.

        One a client, not one a watch: a client with the image open twice
        (a backupfs device's head and the reader its backups read
        snapshots through, engine/rbddevice.py) is one client to stop."""
        assert self.cluster is not None
        me = self.cluster.rados.get_instance_id()
        found = image._call("listing its watchers", lambda: list(image.image.watchers_list()))
        clients: dict[object, str] = {}
        for w in found:
            if w.get("id") != me:
                clients.setdefault(w.get("id"), str(w.get("addr", "?")))
        return list(clients.values())

    def _lock(self, rbd: Any) -> None:
        """Hold the image's exclusive lock while writing: another client that
        opens it meanwhile gets its writes refused, not mixed into ours. An
        image made without the exclusive-lock feature has none to take."""
        assert self.image is not None
        try:
            self.image.image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            self.locked = True
        except (rbd.InvalidArgument, rbd.FunctionNotSupported):
            pass
        except rbd.Error as e:
            text, code = describe_error(e)
            raise CephError(f"{self.spec.source}: taking its exclusive lock: {text}", code) from None

    def _remove_stale(self) -> None:
        """Remove the hidden images that killed restores to this name left: those
        nobody has open (a live restore has its own open)."""
        assert self.cluster is not None
        _, rbd = bindings()
        pattern = _hidden_re(self.spec.image)
        try:
            names = [n for n in rbd.RBD().list(self.cluster.ioctx) if pattern.fullmatch(n)]
        except rbd.Error:
            return  # only tidying: the restore itself reports what is wrong with the pool
        for name in names:
            try:
                with rbd.Image(self.cluster.ioctx, name, read_only=True) as img:
                    if list(img.watchers_list()):  # a read-only open is no watch: someone else's
                        continue
                rbd.RBD().remove(self.cluster.ioctx, name)
            except rbd.Error:
                continue

    def create(self) -> None:
        """Make the new image under its hidden name, opened for writing.

        The caller holds the stop signals back: the image exists only
        once ``self.hidden`` names it, for ``close`` to remove."""
        assert self.cluster is not None
        _, rbd = bindings()
        for _ in range(20):
            name = hidden_name(self.spec.image)
            try:
                with no_stops_in_new_threads():
                    rbd.RBD().create(self.cluster.ioctx, name, self.size)
            except rbd.ImageExists:
                continue
            except rbd.Error as e:
                text, code = describe_error(e)
                raise CephError(f"{self.spec.source}: cannot create the image: {text}", code) from None
            self.hidden = name
            break
        else:
            raise CephError(f"{self.spec.source}: no free name for the new image beside it", errno.EEXIST)
        hidden_spec = RbdSpec(self.spec.pool, self.spec.namespace, self.hidden, self.spec.conf, self.spec.client)
        # RbdImage opens the image its cluster's spec names: for a moment, the hidden one.
        self.cluster.spec = hidden_spec
        try:
            self.image = RbdImage(self.cluster)
        finally:
            self.cluster.spec = self.spec
        self.image.spec = self.spec  # its errors name the image being restored
        self.object_size = self.image.object_size()

    # -- the bytes ------------------------------------------------------------------------

    def write_chunk(self, writer: _AioWriter, pos: int, view: memoryview) -> tuple[int, int]:
        """Start the writes of one chunk: (data bytes, zero bytes) asked for."""
        flags = _nonzero_blocks(view)
        written = zeroed = 0
        for a, b in _runs(flags):
            start, stop = a * BLOCK, min(b * BLOCK, len(view))
            # One request per RADOS object: the cluster serves them in parallel.
            while start < stop:
                end = min(stop, ((pos + start) // self.object_size + 1) * self.object_size - pos)
                writer.write(pos + start, bytes(view[start:end]))
                written += end - start
                start = end
        if self.allocated is not None:
            first = pos // BLOCK
            held = np.frombuffer(self.allocated[first: first + len(flags)].unpack(), dtype=bool)
            for a, b in _runs(~flags & held):
                start, stop = a * BLOCK, min(b * BLOCK, len(view))
                writer.zero(pos + start, stop - start)
                zeroed += stop - start
        return written, zeroed

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> SourceId | None:
        """Flush; a new image gets its name. Its identity (None for an existing image)."""
        assert self.image is not None and self.cluster is not None
        self.image.flush()
        if self.hidden is None:
            return None
        _, rbd = bindings()
        made = rbd_identity(self.cluster, self.image)
        self.image.close()
        try:
            rbd.RBD().rename(self.cluster.ioctx, self.hidden, self.spec.image)
        except rbd.ImageExists:
            raise CephError(f"{self.spec.source} was made by someone else during the restore",
                            errno.EEXIST) from None
        except rbd.Error as e:
            text, code = describe_error(e)
            raise CephError(f"{self.spec.source}: naming the restored image: {text}", code) from None
        self.hidden = None
        return made

    def close(self, ok: bool) -> None:
        """Let go of the image; a new one that did not get its name is removed."""
        _, rbd = bindings()
        if self.image is not None:
            if self.locked:
                try:
                    self.image.image.lock_release()
                except rbd.Error:
                    pass  # closing releases it too
            self.image.close()
        try:
            if self.hidden is not None and self.cluster is not None:
                try:
                    rbd.RBD().remove(self.cluster.ioctx, self.hidden)
                except rbd.Error:
                    pass  # the next restore to this name removes it (_remove_stale)
        finally:
            if self.cluster is not None:
                self.cluster.close()


def restore_to_rbd(
    read: Callable[[int, memoryview], BytesLike],
    size: int,
    spec: RbdSpec,
    *,
    force: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    claim: Claim | None = None,
) -> RestoreResult:
    """Write ``size`` bytes of a backup, as ``read(offset, out)`` gives them,
    into the image ``spec`` names (see the module's notes).

    ``claim(image, identity)`` is called once the target is known and
    checked, before anything is changed: the caller's rules for an image
    that is a device's source (it may refuse by raising).
    """
    job = _Restore(spec, size, force, claim)
    progress = Progress(total=size, phase="restoring")
    zeroed = 0
    ok = False
    writer: _AioWriter | None = None
    try:
        job.open()
        # A new image exists only once job.hidden names it: the stop signals
        # are held back until then, so that close() below can remove it
        # (engine/stopsignals.py).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if job.image is None:
                job.create()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        assert job.image is not None
        writer = _AioWriter(job.image)

        def fill(pos: int, out: memoryview) -> BytesLike:
            try:
                data = read(pos, out)
            except OSError as e:
                raise RestoreError(f"reading the backup at offset {pos}: {e.strerror}",
                                   e.errno or errno.EIO) from None
            if len(data) != len(out):
                raise RestoreError(f"short read of the backup at offset {pos}")
            return data

        def write(pos: int, data: BytesLike) -> None:
            nonlocal zeroed
            assert writer is not None
            writer.check()
            w, z = job.write_chunk(writer, pos, memoryview(data))
            progress.written += w
            zeroed += z
            progress.done = pos + len(data)
            if on_progress is not None:
                on_progress(progress)

        chunks = ((pos, min(CHUNK, size - pos)) for pos in range(0, size, CHUNK))
        copy_chunks(chunks, fill, write, CHUNK)
        writer.drain()
        writer.check()
        made = job.finish()
        ok = True
    except (CephError, RestoreError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, BackupfsError):
            e = RestoreError(f"restoring into {spec.source}: {e.strerror}", e.errno or errno.EIO)
        raise RestoreError(f"{e}{_partly(job, writer, progress)}", getattr(e, "errno", errno.EIO)) from None
    except BackupfsError as e:  # the backup could not be read
        note = _partly(job, writer, progress)
        if not note:
            raise
        raise RestoreError(f"{e}{note}", getattr(e, "errno", errno.EIO)) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or the CLI's SIGTERM: a stop, reported as one
        note = _partly(job, writer, progress)
        if note and job.existed:
            e.add_note(note.removeprefix("; "))  # the CLI says it (backupfs/cli_ops.py)
        raise
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if writer is not None:
                writer.drain()  # librbd holds the buffers until then
            job.close(ok)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    kind = Target.RBD if job.existed else Target.RBD_NEW
    notes = list(job.notes)
    if job.existed:
        notes.append(f"{format_size(zeroed)} zeroed where it held data and the backup holds zeros")
    return RestoreResult(spec.source, size, progress.written, kind, size, identity=made, note="; ".join(notes))


def _partly(job: _Restore, writer: _AioWriter | None, progress: Progress) -> str:
    """What a failed restore left: a new image never gets its name (and is
    removed); an existing one is now partly written, and the user must know."""
    if writer is None or not (job.notes or writer.started):
        return ""  # nothing was written
    if not job.existed:
        return f"; the unfinished image was not given the name {job.spec.image} and is removed"
    done = progress.done
    if writer.failed is not None:
        done = min(done, writer.failed[0])
    if done <= 0:
        return f"; {job.spec.source} may now hold part of the backup: restore again to finish"
    return (f"; {job.spec.source} is now partly written (the backup's first {format_size(done)}, then its old "
            "contents mixed with the backup's): restore again to finish")
