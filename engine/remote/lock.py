"""The remote's writer lock: one push at a time.

``lock.json`` holds its owner (host, pid, when) and a lease. It is created
with ``If-None-Match: *``, so of two pushes that start together exactly one
gets it; the other is refused with the owner's name. The holder renews the
lease (a conditional PUT with ``If-Match`` on the ETag it wrote) while it
works, and deletes the lock at its end.

A lock is taken over only when its owner is certainly gone: its lease ran
out (no renewal for LEASE_SECONDS), or it names this host and a pid that no
longer runs (a push killed with -9 here: the resume need not wait a lease).
The takeover is itself a conditional PUT on the stale lock's ETag, so of two
pushes that find the same stale lock only one takes it; a renewal by an
owner that was merely slow fails on the changed ETag, and that push stops.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import socket
import threading
import time
from typing import Any

from engine.remote.layout import LOCK_KEY
from engine.remote.store import ObjectExists, RemoteError, RemoteStore
from engine.text import escape

LEASE_SECONDS = 300.0


class RemoteBusy(RemoteError):
    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EBUSY)


def _alive_here(owner: dict[str, Any]) -> bool:
    """Whether the lock's owner is a process on this host that still runs."""
    if owner.get("host") != socket.gethostname():
        return True  # another host's: only its lease tells
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) runs no more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _plain_time(value: object) -> bool:
    """A number of seconds a lock may hold: finite, from 0 to the year 9999."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value < 253402300800)


class RemoteLock:
    """Held from ``acquire`` to ``release``; ``check`` raises once it is lost."""

    def __init__(self, store: RemoteStore, lease: float = LEASE_SECONDS) -> None:
        self.store = store
        self.lease = lease
        self.token = secrets.token_hex(8)
        self._etag = ""
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "renewed": time.time(), "lease_seconds": self.lease}).encode()

    def acquire(self) -> None:
        try:
            self._etag = self.store.put_new(LOCK_KEY, self._body()).etag
        except ObjectExists:
            self._take_over()
        self._renewer = threading.Thread(target=self._renew_loop, name="remote-lock", daemon=True)
        self._renewer.start()

    def _take_over(self) -> None:
        found = self.store.head(LOCK_KEY)
        data = self.store.get(LOCK_KEY, limit=64 << 10)
        if found is None or data is None:  # released meanwhile: try once more
            self._etag = self.store.put_new(LOCK_KEY, self._body()).etag
            return
        try:
            owner = json.loads(data)
            if not isinstance(owner, dict):
                raise ValueError
        except ValueError:
            owner = {}
        renewed = owner.get("renewed")
        lease = owner.get("lease_seconds")
        # Someone else's JSON: a time or lease that is not a finite number in range
        # (NaN, 1e20) reads as unknown, never as expired, and is never formatted.
        if not _plain_time(renewed):
            renewed = None
        if not _plain_time(lease):
            lease = None
        expired = (isinstance(renewed, (int, float)) and isinstance(lease, (int, float))
                   and time.time() > renewed + lease)
        who = (f"{escape(str(owner.get('host', '?')))} pid {escape(str(owner.get('pid', '?')))}"
               if owner else "an unreadable lock")
        if not expired and _alive_here(owner):
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(renewed)) if isinstance(
                renewed, (int, float)) else "?"
            raise RemoteBusy(f"{self.store.what}: another push holds the remote's lock ({who}, renewed {since}, "
                             f"lease {lease if isinstance(lease, (int, float)) else '?'} s); try again when it ends"
                             + ("" if renewed is not None and lease is not None else
                                f" (its lease never runs out: if no push runs, delete {LOCK_KEY} from the "
                                "remote by hand)"))
        try:
            self._etag = self.store.replace_if(LOCK_KEY, self._body(), found[0].etag)
        except ObjectExists:
            raise RemoteBusy(f"{self.store.what}: another push took over the stale lock of {who} first") from None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.renew()
            except RemoteError as e:
                self._lost = str(e)
                return

    def renew(self) -> None:
        with self._mutex:
            try:
                self._etag = self.store.replace_if(LOCK_KEY, self._body(), self._etag)
            except ObjectExists:
                self._lost = "another push took the remote's lock over (this one was idle past its lease)"
                raise RemoteBusy(f"{self.store.what}: {self._lost}") from None

    def check(self) -> None:
        """Raise if the lock was lost: nothing more may be written."""
        if self._lost:
            raise RemoteBusy(f"{self.store.what}: lost the remote's lock: {self._lost}")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            found = self.store.head(LOCK_KEY)
            if found is not None and found[0].etag == self._etag and not self._lost:
                self.store.delete([LOCK_KEY])
