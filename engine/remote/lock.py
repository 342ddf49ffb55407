"""The remote's writer lock: one push at a time, from objects that are never rewritten.

The lock is a series of write-once objects ``lock/0000000001.json``,
``lock/0000000002.json``, ... each {host, pid, token, renewed,
lease_seconds} (and ``released: true`` for the last one of a push), each
created with ``If-None-Match: *`` (of two PUTs of one key the second gets
412). The lock's state is the NEWEST number listed:

* acquire: list ``lock/``; the newest is free when there is none, it says
  released, its lease ran out, or it names this host and a pid that no
  longer runs (a push killed with -9 here resumes at once); then create
  newest+1. Every contender that saw the same newest makes the same key:
  one wins, the others get 412 and are refused;
* renew (every lease/3, and before a write when the last renewal began
  more than lease/2 ago): create our number+1 with the same token;
* after each create, *confirm*: a fresh listing must show our new object
  (our ETag) as the newest, and on a renewal our previous one still there
  with our ETag. Only then is the lock held; only then are the numbers
  below ours deleted (so they do not pile up);
* release: create our number+1 saying ``released`` and delete the numbers
  below it. The newest object is never deleted (one small object stays):
  were it deleted, numbers would start again from 1 and a key be made a
  second time, or -- numbered from the clock instead -- two pushes racing
  for a stale lock would make different keys and both hold it (the test
  found that).

So the newest number never goes down, and a number is deleted only below
a higher one: a number made again (after its deletion) is caught by the
confirmation, which lists the higher one. A failed confirmation or a 412
means the lock is lost: nothing more is written (``check`` raises before
every object, part, catalog write and deletion).

Interleavings (A holds N; B and C are other pushes):

1. B and C find the same stale (or released) N and both create N+1: one
   gets 412 and is refused; the other confirms and deletes N.
2. A slow (stopped, or its network stalled) past its lease; B takes over
   with N+1. A's renewal of N+1 gets 412: lost. If B already renewed to
   N+2, or released (N+2 says released), and deleted N+1, A's create of
   N+1 succeeds, but its listing shows N+2: lost (A deletes its stray N+1).
3. A renews N+1 just before B's takeover lands: B gets 412, refused; A holds.
4. B listed long ago (saw N-1 stale) and creates N only after N was
   deleted: N is deleted only once N+1 exists, and B's confirmation lists
   it: B refused.
5. A stray object left by a loser that crashed before deleting it is
   below the newest: never taken for the lock's state.

A holder stops by its own clock: ``check`` renews first when the last
confirmed renewal began more than lease/2 ago, so a write starts at least
lease/2 (150 s) before any other host may take over, and a request is
bounded well inside that (store.py's timeouts). Hosts whose clocks differ
by more than that margin defeat any lease; two hosts with one hostname
defeat only the dead-pid rule (it only ever applies to a pid that does not
run here).

The older backupfs kept one ``lock.json`` it rewrote in place: one found
live (a push of an older version running) refuses as before; an expired
one is deleted. Both versions pushing to one remote at once would not see
each other's locks: upgrade every host that pushes.
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

from engine.remote.layout import LEGACY_LOCK_KEY, LOCK_DIR, LOCK_KEY_RE, MAX_LOCK_NUMBER, lock_key
from engine.remote.store import ObjectExists, ObjectInfo, RemoteError, RemoteStore
from engine.text import escape

LEASE_SECONDS = 300.0
MAX_LOCK_BYTES = 64 << 10
# How often acquire looks again when the newest lock object vanished between
# its listing and its read (a renewal deleted it): each time a new listing.
LOOKS = 5


class RemoteBusy(RemoteError):
    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EBUSY)


def _clock() -> float:
    """Seconds on a clock that keeps counting while the host is suspended (Linux's
    CLOCK_BOOTTIME): time.monotonic() stops then, so a push resumed after hours
    of suspend would have taken its lease for fresh and written past another's takeover."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _alive_here(owner: dict[str, Any]) -> bool:
    """Whether the lock's owner is a process on this host that still runs."""
    if owner.get("host") != socket.gethostname():
        return True  # another host's: only its lease tells
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
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


def _owner(data: bytes) -> dict[str, Any]:
    """A lock object's fields, or {} when it is not a JSON object (someone else's)."""
    try:
        owner = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}


class RemoteLock:
    """Held from ``acquire`` to ``release``; ``check`` raises once it is lost."""

    def __init__(self, store: RemoteStore, lease: float = LEASE_SECONDS) -> None:
        self.store = store
        self.lease = lease
        self.token = secrets.token_hex(8)
        self.number: int | None = None  # our newest lock object, confirmed
        self._etag = ""
        self._renewed_at = 0.0  # _clock() before the create of our newest object
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()

    # -- the bucket ---------------------------------------------------------------------

    def _body(self, released: bool = False) -> bytes:
        doc = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "renewed": time.time(),
               "lease_seconds": self.lease}
        if released:
            doc["released"] = True
        return json.dumps(doc).encode()

    def _numbers(self) -> dict[int, ObjectInfo]:
        """The lock objects listed, by number (keys of another form under lock/ are not ours)."""
        out = {}
        for key, info in self.store.listing(LOCK_DIR + "/").items():
            m = LOCK_KEY_RE.fullmatch(key)
            if m:
                out[int(m.group(1))] = info
        return out

    def _confirm(self, number: int, etag: str, previous: tuple[int, str] | None) -> bool:
        """Our new object is the newest listed, and (a renewal) our previous one is still
        ours; then the numbers below it are deleted. On failure our stray object goes."""
        listed = self._numbers()
        held = (listed.get(number) is not None and listed[number].etag == etag and max(listed) == number
                and (previous is None or (previous[0] in listed and listed[previous[0]].etag == previous[1])))
        if not held:
            if number in listed and listed[number].etag == etag:
                try:
                    self.store.delete([lock_key(number)])
                except RemoteError:
                    pass  # a stray number below a higher one: the holder deletes it
            return False
        older = [lock_key(n) for n in sorted(listed) if n < number]
        if older:
            self.store.delete(older)
        return True

    def _create(self, number: int, released: bool = False) -> tuple[str, float]:
        """Create lock object ``number``; (its ETag, when the creating began)."""
        if number > MAX_LOCK_NUMBER:
            raise RemoteError(f"{self.store.what}: the lock's numbers ran out ({lock_key(MAX_LOCK_NUMBER)}); "
                              f"delete {LOCK_DIR}/ from the remote by hand when no push runs")
        started = _clock()
        return self.store.put_new(lock_key(number), self._body(released)).etag, started

    # -- whether someone else holds it --------------------------------------------------

    def _refuse_if_live(self, key: str, data: bytes) -> None:
        """Raise RemoteBusy unless the lock object ``key`` (its bytes ``data``) is stale."""
        owner = _owner(data)
        if owner.get("released") is True:
            return
        renewed = owner.get("renewed")
        lease = owner.get("lease_seconds")
        # Someone else's JSON: a time or lease that is not a finite number in range
        # (NaN, 1e20) reads as unknown, never as expired, and is never formatted.
        if not _plain_time(renewed):
            renewed = None
        if not _plain_time(lease):
            lease = None
        expired = renewed is not None and lease is not None and time.time() > renewed + lease
        if expired or (owner and not _alive_here(owner)):
            return
        who = (f"{escape(str(owner.get('host', '?'))[:200])} pid {escape(str(owner.get('pid', '?'))[:40])}"
               if owner else "an unreadable lock")
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(renewed)) if renewed is not None else "?"
        raise RemoteBusy(f"{self.store.what}: another push holds the remote's lock ({who}, renewed {since}, "
                         f"lease {lease if lease is not None else '?'} s); try again when it ends"
                         + ("" if renewed is not None and lease is not None else
                            f" (its lease never runs out: if no push runs, delete {key} from the "
                            "remote by hand)"))

    def _legacy(self) -> None:
        """An older backupfs's lock.json: refuse while it is live, delete it once stale."""
        data = self.store.get(LEGACY_LOCK_KEY, limit=MAX_LOCK_BYTES)
        if data is not None:
            self._refuse_if_live(LEGACY_LOCK_KEY, data)
            self.store.delete([LEGACY_LOCK_KEY])

    # -- the lock's life ---------------------------------------------------------------

    def acquire(self) -> None:
        self._legacy()
        for _ in range(LOOKS):
            listed = self._numbers()
            newest = max(listed) if listed else 0
            if newest:
                data = self.store.get(lock_key(newest), limit=MAX_LOCK_BYTES)
                if data is None:
                    continue  # deleted since the listing: a renewal made a newer one
                self._refuse_if_live(lock_key(newest), data)
            number = newest + 1  # what every push that saw this newest makes: one wins
            try:
                etag, started = self._create(number)
            except ObjectExists:
                raise RemoteBusy(f"{self.store.what}: another push took the remote's lock first") from None
            if not self._confirm(number, etag, None):
                raise RemoteBusy(f"{self.store.what}: another push took the remote's lock first")
            self.number, self._etag, self._renewed_at = number, etag, started
            self._renewer = threading.Thread(target=self._renew_loop, name="remote-lock", daemon=True)
            self._renewer.start()
            return
        raise RemoteBusy(f"{self.store.what}: the remote's lock kept changing while it was read; try again")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.renew()
            except RemoteError as e:
                self._lost = self._lost or str(e)
                return

    def renew(self) -> None:
        """Create our next number; a 412 or a failed confirmation: the lock is lost."""
        with self._mutex:
            self._renew_locked()

    def _renew_locked(self) -> None:
        if self._lost:
            raise RemoteBusy(f"{self.store.what}: lost the remote's lock: {self._lost}")
        if self.number is None:
            raise RemoteBusy(f"{self.store.what}: the remote's lock is not held (released, or never taken)")
        previous = (self.number, self._etag)
        try:
            etag, started = self._create(self.number + 1)
        except ObjectExists:
            etag = ""
        if not etag or not self._confirm(self.number + 1, etag, previous):
            self._lost = "another push took the remote's lock over (this one was idle past its lease)"
            raise RemoteBusy(f"{self.store.what}: {self._lost}")
        self.number, self._etag, self._renewed_at = self.number + 1, etag, started

    def check(self) -> None:
        """Raise if the lock was lost: nothing more may be written. A renewal overdue
        (a process stopped, a thread starved) is made first, before the write."""
        if self._lost:
            raise RemoteBusy(f"{self.store.what}: lost the remote's lock: {self._lost}")
        if _clock() - self._renewed_at > self.lease / 2:
            with self._mutex:
                if _clock() - self._renewed_at > self.lease / 2:
                    try:
                        self._renew_locked()
                    except RemoteBusy:
                        raise
                    except RemoteError as e:
                        self._lost = self._lost or str(e)
                        raise

    def abandon(self) -> None:
        """Stop renewing and leave the lock object (the endpoint is out of reach): it runs
        out with its lease, or a push from this host takes it over at once."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()

    def release(self) -> None:
        """Write our next number saying released, then delete ours below it. A 412: someone
        took the lock over (ours was lost), and theirs is not ours to touch."""
        self.abandon()
        with self._mutex:
            if self._lost or self.number is None:
                return
            number, self.number = self.number, None
            try:
                self._create(number + 1, released=True)
            except ObjectExists:
                return
            listed = self._numbers()
            older = [lock_key(n) for n in sorted(listed) if n <= number]
            if older:
                self.store.delete(older)
