"""One RBD image: its size and identity, its snapshots, its changes, its bytes.

A thin layer over librbd's Image with the errors made one line each
(engine/ceph.py) and the few things backupfs needs said once:

- snapshots are named ``backupfs-<backup id>`` and recognised by name
  *and* id: a snapshot someone removed and made again under the same
  name holds another point in time, so it is not the one a backup took;
- ``changed_units`` turns ``diff_iterate`` into copy clusters as it goes
  (one bit a unit: memory follows the image's size in units, not the
  number of extents RBD reports);
- ``allocated_units``: what a full backup or a scan needs to read at all
  (an unwritten RBD region reads as zeros and is not stored).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, TypeVar

from bitarray import bitarray

from engine.ceph import CephError, Cluster, RbdSpec, bindings, describe_error
from engine.stopsignals import no_stops_in_new_threads

SNAP_PREFIX = "backupfs-"
T = TypeVar("T")


def snapshot_name(backup_id: str) -> str:
    """The RBD snapshot a backup takes its point in time from."""
    return SNAP_PREFIX + backup_id


class RbdImage:
    """An open image (its head, or one snapshot read-only) on a ``Cluster``."""

    def __init__(self, cluster: Cluster, snapshot: str | None = None, read_only: bool = False) -> None:
        _, rbd = bindings()
        self.cluster = cluster
        self.spec: RbdSpec = cluster.spec
        self.snapshot = snapshot
        try:
            with no_stops_in_new_threads():  # librbd starts threads at a first open (engine/ceph.py)
                self.image = rbd.Image(cluster.ioctx, self.spec.image, snapshot=snapshot,
                                       read_only=read_only or snapshot is not None)
                # Registered before a stop held back during the open is raised
                # (as the block ends): the cluster's close then closes it too,
                # where librbd crashed the process on an image left open.
                cluster.images.add(self)
        except rbd.ImageNotFound:
            where = f"pool {self.spec.pool!r}" + (f", namespace {self.spec.namespace!r}" if self.spec.namespace
                                                  else "")
            what = f"no image {self.spec.image!r} in {where}"
            if snapshot is not None:
                what = f"no snapshot {snapshot!r} of the image (or no image)"
            raise CephError(f"{self.spec.source}: {what}", errno.ENOENT) from None
        except rbd.Error as e:
            text, code = describe_error(e)
            raise CephError(f"{self.spec.source}: cannot open the image: {text}", code) from None

    # -- facts -----------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args)``, with librbd's errors as one-line CephErrors naming ``what``."""
        _, rbd = bindings()
        try:
            return fn(*args, **kwargs)
        except rbd.Error as e:
            text, code = describe_error(e)
            raise CephError(f"{self.spec.source}: {what}: {text}", code) from None

    def size(self) -> int:
        return self._call("reading its size", self.image.size)

    def image_id(self) -> str:
        """librbd's id of the image: stays through a rename, differs for an image made anew."""
        return self._call("reading its id", self.image.id)

    def object_size(self) -> int:
        return int(self._call("reading its layout", self.image.stat)["obj_size"])

    def watchers(self) -> list[str]:
        """Clients that have the image open now (a running VM, a mapping)."""
        try:
            found = self._call("listing its watchers", self.image.watchers_list)
        except CephError:
            return []
        return [str(w.get("addr", "?")) for w in found]

    # -- snapshots --------------------------------------------------------------------

    def snapshots(self) -> dict[str, int]:
        """Name -> id of the image's snapshots."""
        found = self._call("listing its snapshots", lambda: list(self.image.list_snaps()))
        return {str(s["name"]): int(s["id"]) for s in found}

    def set_snapshot(self, name: str | None) -> None:
        """Read snapshot ``name`` from now on (None: the head again)."""
        self._call(f"opening snapshot {name}" if name else "leaving its snapshot", self.image.set_snap, name)
        self.snapshot = name

    def create_snapshot(self, name: str) -> None:
        """Take snapshot ``name`` now."""
        self._call(f"taking snapshot {name}", self.image.create_snap, name)

    def snapshot_id(self, name: str) -> int:
        """Snapshot ``name``'s id. Asked of the handle that made it, this
        waits for that handle to read the image's header again (1.6 ms
        here); of one just set to it, it is known (0.03 ms)."""
        return self._call(f"reading snapshot {name}'s id", self.image.snap_get_id, name)

    def remove_snapshot(self, name: str, snap_id: int | None = None) -> bool:
        """Remove snapshot ``name`` if it is there (and, given ``snap_id``,
        only if it is still that snapshot); whether one was removed."""
        _, rbd = bindings()
        found = self.snapshots().get(name)
        if found is None or (snap_id is not None and found != snap_id):
            return False
        try:
            self.image.remove_snap(name)
        except rbd.ImageNotFound:
            return False
        except rbd.Error as e:
            text, code = describe_error(e)
            raise CephError(f"{self.spec.source}: removing snapshot {name}: {text}", code) from None
        return True

    # -- what to read --------------------------------------------------------------------

    def _diff(self, since: str | None, size: int, on_extent: Callable[[int, int, bool], None]) -> None:
        self._call("asking what changed (diff_iterate)", self.image.diff_iterate, 0, size, since,
                   lambda off, length, exists: on_extent(off, length, exists) or 0)

    def changed_units(self, since: str | None, unit: int, size: int) -> bitarray:
        """One bit a copy cluster: set where RBD reports a change since
        snapshot ``since`` (None: anything ever written) up to this image's
        point in time (the snapshot it was opened at). Discarded regions
        count as changed: they read as zeros now."""
        n = -(-size // unit)
        bits = bitarray(n, endian="little")
        bits.setall(0)

        def mark(off: int, length: int, exists: bool) -> None:
            if length > 0:
                bits[off // unit: min(-(-(off + length) // unit), n)] = 1

        self._diff(since, size, mark)
        return bits

    def allocated_units(self, unit: int, size: int) -> bitarray:
        """One bit a copy cluster: set where the image holds data (written
        and not discarded); the rest reads as zeros."""
        n = -(-size // unit)
        bits = bitarray(n, endian="little")
        bits.setall(0)

        def mark(off: int, length: int, exists: bool) -> None:
            if exists and length > 0:
                bits[off // unit: min(-(-(off + length) // unit), n)] = 1

        self._diff(None, size, mark)
        return bits

    # -- bytes -----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        data = self._call(f"reading {length} bytes at {offset}", self.image.read, offset, length)
        if len(data) != length:
            raise CephError(f"{self.spec.source}: short read at {offset} ({len(data)} of {length} bytes)",
                            errno.EIO)
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        return self._call(f"writing at {offset}", self.image.write, bytes(data), offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros that read back as zeros: a discard under 64 KiB does nothing in RBD."""
        self._call(f"writing zeros at {offset}", self.image.write_zeroes, offset, length)

    def flush(self) -> None:
        self._call("flushing", self.image.flush)

    def close(self) -> None:
        """Close the image (again: a no-op), before its cluster's connection."""
        _, rbd = bindings()
        self.cluster.images.discard(self)
        try:
            self.image.close()
        except rbd.Error:
            pass
