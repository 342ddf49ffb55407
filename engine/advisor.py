"""One thread that hands read-ahead advice to the kernel for many readers.

Why a thread: advice is a system call that does real work. Asking for a
deep chain's scattered pieces (POSIX_FADV_WILLNEED) allocates page-cache
pages and builds a disk request for each run before it returns: measured
on a 64-deep 1 GiB chain with caches dropped, a 16 MiB window took 2 ms
(0.4 s per GiB read), and a full disk queue makes it wait longer. Made on a
server's event loop, that time is taken from every other request it
serves, the guest's device writes included. On this thread it overlaps
with them, and with the reader's own copying.

Advice is only advice: when the thread falls behind, new requests are
dropped (the reader then waits for the disk itself, as with no advice),
never queued without bound.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from engine.stopsignals import no_stops_in_new_threads

log = logging.getLogger(__name__)

MAX_PENDING = 64  # requests waiting; beyond it new ones are dropped


class Advisor:
    """Runs advice requests in order on one daemon thread, started on first use."""

    def __init__(self, name: str = "read-ahead advice", max_pending: int = MAX_PENDING) -> None:
        self._name = name
        self._max_pending = max_pending
        self._pending: deque[tuple[Callable[[], object], Callable[[], None]]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.done_count = 0  # requests run (for tests and the unmount log)
        self.dropped_count = 0  # requests not run: the queue was full, or closing

    def submit(self, advise: Callable[[], object], finished: Callable[[], None] = lambda: None) -> bool:
        """Run ``advise()`` on the thread, then ``finished()``; False if dropped.

        ``finished`` runs exactly once whatever happens, also for a dropped
        request (at once, on the caller's thread): it releases what the
        advice needed kept open.
        """
        with self._cond:
            accepted = not self._closed and len(self._pending) < self._max_pending
            if accepted:
                self._pending.append((advise, finished))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    with no_stops_in_new_threads():  # see engine/stopsignals.py
                        self._thread.start()
                self._cond.notify()
            else:
                self.dropped_count += 1
        if not accepted:
            self._finish(finished)
        return accepted

    def close(self) -> None:
        """Finish the request running now, drop the waiting ones, stop the thread."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self.dropped_count += len(dropped)
            self._cond.notify()
            thread = self._thread
        for _advise, finished in dropped:
            self._finish(finished)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed and drained
                advise, finished = self._pending.popleft()
            try:
                advise()
            except Exception:  # advice must never take the thread down
                log.exception("read-ahead advice failed")
            finally:
                with self._cond:
                    self.done_count += 1
                self._finish(finished)

    @staticmethod
    def _finish(finished: Callable[[], None]) -> None:
        try:
            finished()
        except Exception:  # a release that fails must not stop the thread (or the caller)
            log.exception("releasing after read-ahead advice failed")
