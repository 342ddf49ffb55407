"""The request relay (backupfs/_relay.c): device I/O in C threads, the rest in pyfuse3.

``start_relay`` is called once pyfuse3 has mounted and before it serves:
it finds the session's FUSE device among our descriptors and hands it to
the relay. Where the relay cannot run (the extension is not built, the
system will not size its socket buffers, or the descriptor is not found)
the mount serves everything through pyfuse3 as before, and the log says
why. Invalidations then go through ``Relay.notify`` (written straight to
the device, synchronously, as pyfuse3's own did), built here.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

try:
    from backupfs._relay import Relay
except ImportError:  # built without a compiler
    Relay = None

READERS = 4  # threads reading requests: a VM keeps 16-32 in flight, each served in microseconds
MAX_BACKGROUND = 64  # the kernel's async direct I/O in flight (its default: 12)

_OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error (the notify code), unique (0)
_INVAL_ENTRY = struct.Struct("<QII")  # parent, namelen, flags
_INVAL_INODE = struct.Struct("<Qqq")  # ino, offset, length
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3


def fuse_device_fd() -> int | None:
    """Our one descriptor of /dev/fuse (pyfuse3's session), or None if not exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def start_relay(read: Callable[[int, int, int, memoryview], int | None]) -> Any | None:
    """The running relay, or None (and a log line saying why) where it cannot run.

    ``read(fh, offset, size, buffer)`` serves reads of the handles registered
    with None (backups) in the relay's threads, with the GIL: the bytes read
    into ``buffer``, -errno, or None to pass the request to pyfuse3.
    """
    if Relay is None:
        log.info("device I/O is served by pyfuse3: the relay extension is not built")
        return None
    fd = fuse_device_fd()
    if fd is None:
        log.info("device I/O is served by pyfuse3: the FUSE session's descriptor was not found")
        return None
    relay = Relay()
    relay.set_reader(read)
    try:
        relay.start(fd, READERS, MAX_BACKGROUND)
    except OSError as e:
        log.info("device I/O is served by pyfuse3: the relay cannot start (%s)", e.strerror or e)
        return None
    log.info("device I/O is served by %d relay threads", READERS)
    return relay


def inval_entry_message(parent: int, name: bytes) -> bytes:
    body = _INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
    return _OUT_HEADER.pack(_OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def inval_attrs_message(inode: int) -> bytes:
    """Attributes only: a negative offset (as libfuse's attr_only) keeps the page cache."""
    body = _INVAL_INODE.pack(inode, -1, 0)
    return _OUT_HEADER.pack(_OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body
