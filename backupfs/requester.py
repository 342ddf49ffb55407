"""Who asked for a job, and whether they have given up waiting for it.

A trigger's ``write()`` returns only when the backup is done, so the writer
sits in the kernel for as long as the job runs. The kernel tells a FUSE
daemon about a signal with FUSE_INTERRUPT, but pyfuse3 drops that message,
and after a fatal signal the kernel waits for our answer *uninterruptibly*:
without help, Ctrl-C, ``kill``, ``kill -9``, ``timeout`` and ``systemctl
stop`` all leave the writer stuck in state D until the copy ends.

So the filesystem notes the requesting thread when the trigger file is
opened and, while the job runs, looks at its pending signals in
``/proc/<tid>/status``. A signal that will stop the writer means the user
wants out: the job is cancelled (bitmap kept) and the write answered EINTR.
That is Ctrl-C (SIGINT, whether the program catches it, as Python and the
shells do, or not), and SIGTERM, SIGQUIT, SIGHUP or SIGKILL when they will
kill it. A caught SIGTERM or SIGHUP is left alone: the program has its own
plans for it (a reload, say), and if it were answered EINTR it would only
retry the write and start the backup again from nothing. Harmless signals
(SIGCHLD from a shell's background job, SIGWINCH, SIGUSR1) and signals the
writer blocks are ignored too.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

# In the order they are named when several are pending: the signal the user
# sent before SIGKILL, which the kernel also sets in a thread's pending set
# whenever a signal without a handler is about to kill the process.
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGKILL)
STOP_EVEN_CAUGHT = (signal.SIGINT, signal.SIGKILL)  # SIGKILL cannot be caught anyway


def stopping_signal(status_text: str) -> int | None:
    """The stopping signal pending and not blocked in a ``/proc/<tid>/status`` text."""
    masks: dict[str, int] = {}
    for line in status_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("SigPnd", "ShdPnd", "SigBlk", "SigCgt"):
            try:
                masks[key] = int(value.strip(), 16)
            except ValueError:
                return None
    pending = (masks.get("SigPnd", 0) | masks.get("ShdPnd", 0)) & ~masks.get("SigBlk", 0)
    caught = masks.get("SigCgt", 0)
    for sig in STOPPING:
        bit = 1 << (sig - 1)
        if pending & bit and (sig in STOP_EVEN_CAUGHT or not caught & bit):
            return int(sig)
    return None


def _start_time(tid: int) -> str | None:
    """Field 22 of /proc/<tid>/stat: tells a reused pid from the one we saw."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True)
class Requester:
    """The thread that opened a trigger file (FUSE gives its id in the request)."""

    tid: int
    name: str
    started: str | None

    @classmethod
    def of(cls, tid: int) -> Requester | None:
        if tid <= 0:  # a request the kernel made on no process's behalf
            return None
        try:
            with open(f"/proc/{tid}/comm", "rb") as f:
                name = f.read().decode(errors="replace").strip()
        except OSError:
            return None
        return cls(tid, name, _start_time(tid))

    def describe(self) -> str:
        return f"pid {self.tid} ({self.name})"

    def stopping_signal(self) -> int | None:
        """A stopping signal waiting for this thread, or None (also if it is gone)."""
        if self.started is None or _start_time(self.tid) != self.started:
            return None  # gone, or the id now names someone else: not ours to judge
        try:
            with open(f"/proc/{self.tid}/status", "rb") as f:
                return stopping_signal(f.read().decode(errors="replace"))
        except OSError:
            return None
