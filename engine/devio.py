"""A device's shared I/O state: its dirty marks and its mtime bookkeeping.

Device.write (Python) and the mount's C threads (engine/_devio.c, reached
through backupfs/_relay.c) both write a device; this is what they share,
so each accounts for the other: the bitmaps they mark (atomically), whether
writes may run in C at all (not while a job runs or starts), and the
source's mtime as our own writes left it with how many of them are in
flight (what tells another program's write from ours).

``new_device_io`` gives the C object when the extension is built, else
``PythonDeviceIO``, the same rules with nothing served in C.
"""

from __future__ import annotations

import threading
from typing import Protocol

from bitarray import bitarray

try:
    from engine._devio import DevIO as _CDevIO
except ImportError:  # built without a compiler: everything the Python way
    _CDevIO = None


class DeviceIO(Protocol):
    seen_mtime_ns: int

    def set_bitmaps(self, since_last: bitarray, since_full: bitarray) -> None: ...
    def block(self) -> None: ...
    def unblock(self) -> None: ...
    def set_writes(self, on: bool) -> None: ...
    def mark(self, offset: int, length: int) -> None: ...
    def note_outside(self, mtime_ns: int, regular: bool, racing: bool, begin: bool = False) -> bool: ...
    def begin_write(self) -> None: ...
    def end_write(self, mtime_ns: int) -> None: ...
    def stats(self) -> tuple[int, int, int]: ...


class PythonDeviceIO:
    """engine/_devio.c's bookkeeping, for a build without it (nothing runs in C)."""

    def __init__(self, fd: int, size: int, granularity: int, seen_mtime_ns: int) -> None:
        self.size = size
        self.shift = granularity.bit_length() - 1
        self._lock = threading.Lock()
        self._seen = seen_mtime_ns
        self._in_flight = 0
        self._bitmaps: tuple[bitarray, ...] = ()

    @property
    def seen_mtime_ns(self) -> int:
        with self._lock:
            return self._seen

    @seen_mtime_ns.setter
    def seen_mtime_ns(self, value: int) -> None:
        with self._lock:
            self._seen = value

    def set_bitmaps(self, since_last: bitarray, since_full: bitarray) -> None:
        self._bitmaps = (since_last, since_full)

    def block(self) -> None:
        pass

    def unblock(self) -> None:
        pass

    def set_writes(self, on: bool) -> None:
        pass

    def mark(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return
        with self._lock:
            for bits in self._bitmaps:
                bits[offset >> self.shift : ((end - 1) >> self.shift) + 1] = 1

    def note_outside(self, mtime_ns: int, regular: bool, racing: bool, begin: bool = False) -> bool:
        with self._lock:
            moved = False
            if regular and not self._in_flight and (mtime_ns > self._seen if racing else mtime_ns != self._seen):
                self._seen = mtime_ns
                moved = True
            if begin:
                self._in_flight += 1
            return moved

    def begin_write(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end_write(self, mtime_ns: int) -> None:
        with self._lock:
            self._seen = max(self._seen, mtime_ns)
            self._in_flight -= 1

    def stats(self) -> tuple[int, int, int]:
        return 0, 0, 0


def new_device_io(fd: int, size: int, granularity: int, seen_mtime_ns: int) -> DeviceIO:
    """The device's I/O state; it starts blocked (nothing in C) until its
    bitmaps are set and it is unblocked."""
    if _CDevIO is not None:
        return _CDevIO(fd, size, granularity, seen_mtime_ns)  # type: ignore[no-any-return]
    return PythonDeviceIO(fd, size, granularity, seen_mtime_ns)
