"""When a write to a device may run on the event loop instead of a thread.

A hop to a worker thread costs more than the write itself: fio 4 KiB random
writes through the mount took 386 us each in a thread, 152 us inline
(QEMU's FUSE export: 124 us). But Linux cannot promise that a buffered write
will not wait (ext4 refuses RWF_NOWAIT for them): the kernel may throttle a
writer that dirties memory faster than the disk drains it, or wait on the
journal, and a wait on the event loop stalls every other request of the
mount.

So device writes run inline while they are fast, and every write is timed
(the pwrite itself, not the waits for a job before it). One that took
longer than SLOW (inline or in a thread) shows the kernel is
making writers wait: for a while, writes go to threads, and every slow one
there extends the while. The first inline write after it is a probe: slow
again, and the next while is twice as long (up to MAX_HOLD, for a source on
a slow network file system); fast, and it is back to HOLD. The loop pays one
slow write when pressure starts, not one per request while it lasts. What
must wait for sure (a running job's copy-before-write, a job starting, a
page to be read from disk first) never runs inline:
Device.write(nowait=True) refuses it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

SLOW = 0.002  # seconds: a write of a cached MiB takes well under this
HOLD = 2.0  # seconds of threaded writes after a slow one...
MAX_HOLD = 64.0  # ...doubling while inline probes keep finding writes slow
INLINE_MAX = 1024 * 1024  # larger writes are rare (max_write), and long to copy


class InlineWrites:
    """The inline-or-thread decision for one device's writes."""

    def __init__(self, slow: float = SLOW, hold: float = HOLD, max_hold: float = MAX_HOLD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slow = slow
        self.base_hold = hold
        self.max_hold = max_hold
        self.hold = hold
        self.clock = clock
        self._lock = threading.Lock()
        self.threaded_until = 0.0
        self.held = False  # a hold began and no inline write has run since
        self.inline = 0  # counts, for the log and the tests
        self.threaded = 0
        self.slow_writes = 0

    def allowed(self, length: int) -> bool:
        return length <= INLINE_MAX and self.clock() >= self.threaded_until

    def record(self, seconds: float, inline: bool) -> None:
        """A write took ``seconds``: maybe send the next ones to threads for a while."""
        with self._lock:  # threads' writes report here too
            probe = False
            if inline:
                self.inline += 1
                probe, self.held = self.held, False  # the first inline write after a hold
            else:
                self.threaded += 1
            if seconds <= self.slow:
                if probe:
                    self.hold = self.base_hold
                return
            self.slow_writes += 1
            if probe:
                self.hold = min(self.hold * 2, self.max_hold)
            self.threaded_until = self.clock() + self.hold
            self.held = True

    def inline_took(self, seconds: float) -> None:
        self.record(seconds, inline=True)

    def thread_took(self, seconds: float) -> None:
        self.record(seconds, inline=False)

    def summary(self) -> str:
        return f"{self.inline} writes inline, {self.threaded} in threads, {self.slow_writes} slow"
