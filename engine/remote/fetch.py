"""A remote backup's bytes: its lineage's objects, checked, as one chain.

Used by `restore` and `verify` of an ``s3://`` remote (and later by what
mounts one). The chain is built from the catalog's lineage and object keys,
never by following the backing names inside the images: those name the
local files (a pushed rewrite ``<id>.r1.qcow2`` still names its parent by
the parent's local name). Each object is checked against the size and
checksum the catalog records before it is used.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from engine.chain import ChainView
from engine.errors import ErrnoError
from engine.layout import image_name
from engine.qcow2.layers import open_layer
from engine.remote.digest import StreamDigest
from engine.remote.layout import RemoteObject
from engine.remote.remotecatalog import RemoteCatalog
from engine.remote.store import RemoteError, RemoteStore


class DamagedObject(RemoteError):
    """An object is not what the catalog recorded (size or checksum)."""


def download_checked(store: RemoteStore, obj: RemoteObject, path: str,
                     on_bytes: Callable[[int], None] | None = None) -> None:
    """``obj`` into a new private file at ``path``, refused unless its size and checksum
    are the catalog's."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    digest = obj.checksum.digest()
    written = 0

    def sink(data: bytes) -> None:
        nonlocal written
        written += len(data)
        if written > obj.size:  # refused before it lands: a grown object never fills the disk
            raise DamagedObject(f"{store.what}: {obj.key} is damaged: more than the {obj.size} bytes "
                                "the catalog records")
        digest.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            raise ErrnoError(f"{path}: cannot write the downloaded image: {e.strerror}", e.errno or errno.EIO) \
                from None
        if on_bytes:
            on_bytes(len(data))

    try:
        size = store.stream(obj.key, sink)
    finally:
        os.close(fd)
    check_object(store.what, obj, size, digest)


def check_object(what: str, obj: RemoteObject, size: int, digest: StreamDigest) -> None:
    if size != obj.size:
        raise DamagedObject(f"{what}: {obj.key} is damaged: {size} bytes, the catalog records {obj.size}")
    if not obj.checksum.matches(digest):
        raise DamagedObject(f"{what}: {obj.key} is damaged: its checksum is not the one the catalog records")


def verify_object(store: RemoteStore, obj: RemoteObject, on_bytes: Callable[[int], None] | None = None) -> None:
    """Read ``obj`` back whole and check it against the catalog."""
    digest = obj.checksum.digest()
    read = 0

    def sink(data: bytes) -> None:
        nonlocal read
        read += len(data)
        if read > obj.size:  # no need to read the rest of a grown object to know
            raise DamagedObject(f"{store.what}: {obj.key} is damaged: more than the {obj.size} bytes "
                                "the catalog records")
        digest.update(data)
        if on_bytes:
            on_bytes(len(data))

    check_object(store.what, obj, store.stream(obj.key, sink), digest)


def fetch_chain(store: RemoteStore, catalog: RemoteCatalog, backup_id: str, directory: str,
                on_bytes: Callable[[int], None] | None = None) -> ChainView:
    """Download backup ``backup_id``'s lineage into ``directory`` (private, the caller's
    to remove) and open it as one chain, tip first, as the catalog says."""
    lineage = catalog.lineage(backup_id)
    paths = []
    for entry in lineage:
        path = os.path.join(directory, image_name(entry.record.id))
        download_checked(store, entry.image, path, on_bytes)
        paths.append(path)
    layers = []
    try:
        for path in paths:
            layers.append(open_layer(path, "qcow2"))
        return ChainView(layers)
    except BaseException:
        for layer in layers:
            layer.close()
        raise


def lineage_bytes(catalog: RemoteCatalog, backup_id: str) -> int:
    """What fetch_chain downloads for ``backup_id``."""
    return sum(e.image.size for e in catalog.lineage(backup_id))
