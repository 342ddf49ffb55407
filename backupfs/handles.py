"""Open files of a mount by handle number, and the handler wrapper every request goes through.

Shared by the local mount's operations (backupfs/fs.py) and the remote
mount's (backupfs/remotefs.py): what an open file holds (``Handle``), the
table that numbers them, and ``handler``, which turns whatever a request
raises into the errno its reply carries.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from backupfs.requester import Requester
from backupfs.tree import Attributes, Node, RequestError
from backupfs.views import BackupView
from engine.errors import BackupfsError

log = logging.getLogger("backupfs.fs")


@dataclass
class Handle:
    node: Node
    content: bytes = b""  # rendered text files, fixed at open
    view: BackupView | None = None
    entries: list[tuple[bytes, Node]] = field(default_factory=list)
    next_off: int = 0  # where a sequential reader of a backup reads next
    advised_to: int = 0  # how far ahead the kernel has been told to read
    requester: Requester | None = None  # who opened a trigger file for writing
    opened: float = field(default_factory=time.monotonic)
    attrs: list[Attributes | None] = field(default_factory=list)  # a guest listing's, made off the loop
    guest: GuestFile | None = None  # an open file inside a backup's files
    pid: int = 0  # who opened it (a refused `device remove` names them)


@dataclass
class GuestFile:
    """What an open guest file holds: its backup's disk (kept open), volume and data."""

    disk: Any
    rec: Any
    volume: Any
    data: Any


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


def handler(fn: F) -> F:
    """Every request ends in a reply: FUSEError passes, the rest becomes an errno."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except RequestError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except BackupfsError as e:
            log.info("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except OSError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class HandleTable:
    """Open files by handle number, for an Operations class (the local mount's
    and the remote mount's): the class sets ``_handles`` and ``_next_fh``."""

    _handles: dict[int, Handle]
    _next_fh: int

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle


