"""The signals whose handlers stop a command by raising (Ctrl-C, and the
CLI's SIGTERM and SIGHUP, backupfs/cli.py).

A handler's exception can land between any two Python statements, so code
that creates something only a ``try`` can undo holds these back from just
before the creation until inside that ``try`` (restore's temporary file, a
backup's registered job): a stop arriving in between is raised there.

That holds only if no other thread takes them. A signal sent to the process
(a terminal's Ctrl-C, `kill PID`) goes to any thread that does not block
it, and Python then runs the handler in the main thread at its next
statement, blocked there or not. So every thread backupfs starts is started
with them blocked (``no_stops_in_new_threads``): the kernel can only deliver
them to the main thread, which holds them back when it must.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def no_stops_in_new_threads() -> Iterator[None]:
    """Threads started inside (ours, or a library's: tqdm's monitor) block
    the stop signals for good: a thread inherits the mask of the one that
    starts it. The caller's own mask is as it was after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def block_stops_in_this_thread() -> None:
    """A pool's thread initializer (ThreadPoolExecutor starts its threads
    in whichever thread submits work): the stop signals blocked from the
    thread's first step on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
