"""Who besides its owner may use a mount, and what the mount shows them.

A FUSE mount is its mounter's alone unless it is made with ``allow_other``:
the kernel refuses every other user before any mode is looked at. Past
that, ``default_permissions`` (always on, pyfuse3's default) has the kernel
check the modes, owner and group that the daemon reports. Group access is
built from both:

- ``gid=G`` reports group G on the mount's own files (everything but a
  guest's files, which keep the guest's owners) and ``umask=027`` (the
  default when a group is named) takes the others' bits away, so the
  kernel itself lets the owner and G in and nobody else, on paths it has
  cached too;
- ``allow_group=G`` is ``gid=G`` plus a check in the daemon of every
  request that reaches it: the owner, root and members of G (by the
  requester's primary group or its supplementary groups) get in,
  everyone else EACCES, whatever the modes say.

Either asks FUSE for ``allow_other`` (backupfs/mount.py). Writing stays the
owner's: the device file is 0600 and the snapshot file 0640 (the group may
read a job's status, not start one), and the daemon refuses a write open by
anyone else (fs.py).

Nothing here imports pyfuse3: the rules are tested without a mount.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass, field

from engine.access import group_name, resolve_group
from engine.errors import UsageError

ALLOW_GROUP, GID, UMASK = "allow_group", "gid", "umask"
VALUE_OPTIONS = (ALLOW_GROUP, GID, UMASK)
GROUP_UMASK = 0o027  # when a group is named and no umask: the group reads, others get nothing

# A requester's groups are read from /proc for each request that needs
# them; kept this long per (pid, uid, gid), so that `ls -l` of 1,000
# backups reads them once, not 1,000 times.
GROUPS_TTL = 1.0
GROUPS_CACHED = 1024


def check_value(name: str, value: str) -> str:
    """A value option's value as the mount record keeps it; a bad one refused
    here, before the daemon starts (a group by its number, a umask in octal)."""
    if name in (ALLOW_GROUP, GID):
        if not value:
            raise UsageError(f"mount option {name} needs a group: -o {name}=GROUP (a name or a gid)")
        return str(resolve_group(value))
    if name == UMASK:
        try:
            mask = int(value, 8)
        except ValueError:
            mask = -1
        if not 0 <= mask <= 0o777:
            raise UsageError(f"mount option umask={value!r} is not an octal mask from 000 to 777 (e.g. umask=027)")
        return f"{mask:03o}"
    raise UsageError(f"mount option {name!r} takes no value")


def describe_options(options: tuple[str, ...] | list[str]) -> str:
    """A mount's recorded options for people: groups by their names."""
    out = []
    for opt in options:
        name, sep, value = opt.partition("=")
        if sep and name in (ALLOW_GROUP, GID) and value.isdigit():
            opt = f"{name}={group_name(int(value))}"
        out.append(opt)
    return ",".join(out)


def read_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of process (or thread) ``pid``, from
    ``/proc/<pid>/status``: the credentials it runs with now (after
    ``newgrp`` or ``setpriv``), which the group database cannot tell.
    Nothing when it is gone or unreadable."""
    if pid <= 0:
        return frozenset()
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line[7:].split())
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass
class MountAccess:
    """The access a mount grants: ``owner`` (the daemon's uid) always; with
    ``group`` (``allow_group``), the daemon also lets that group's members in;
    ``shown_gid`` and ``umask`` are what the mount's own files show."""

    owner: int
    group: int | None = None
    shown_gid: int | None = None
    umask: int = 0
    _groups: dict[tuple[int, int, int], tuple[frozenset[int], float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_options(cls, options: list[str], owner: int | None = None) -> MountAccess:
        """From the mount's own options (``allow_group=G``, ``gid=G``, ``umask=M``,
        values as ``check_value`` left them)."""
        values = dict(o.split("=", 1) for o in options if "=" in o)
        group = int(values[ALLOW_GROUP]) if ALLOW_GROUP in values else None
        shown = int(values[GID]) if GID in values else group
        if UMASK in values:
            umask = int(values[UMASK], 8)
        else:
            umask = GROUP_UMASK if shown is not None else 0
        return cls(os.getuid() if owner is None else owner, group, shown, umask)

    @property
    def shared(self) -> bool:
        """Other users are meant to get in (FUSE must be asked for allow_other)."""
        return self.shown_gid is not None

    def privileged(self, uid: int) -> bool:
        """The owner and root: everything, as in a private mount."""
        return uid in (0, self.owner)

    def lets_in(self, uid: int, gid: int, pid: int) -> bool:
        """Whether a request of ``uid``/``gid`` from thread ``pid`` may be served
        at all (without ``allow_group``: yes, the kernel has decided)."""
        if self.group is None or self.privileged(uid) or gid == self.group:
            return True
        return self.group in self._groups_of(pid, uid, gid)

    def _groups_of(self, pid: int, uid: int, gid: int) -> frozenset[int]:
        """``read_groups``, kept GROUPS_TTL seconds per (pid, uid, gid): a
        process that leaves the group (or a new one given its pid, same uid
        and gid) is judged by the old groups for at most that long."""
        key = (pid, uid, gid)
        now = time.monotonic()
        with self._lock:
            found = self._groups.get(key)
            if found is not None and found[1] > now:
                return found[0]
        groups = read_groups(pid)
        with self._lock:
            if len(self._groups) >= GROUPS_CACHED:
                self._groups.clear()
            self._groups[key] = (groups, now + GROUPS_TTL)
        return groups

    def mode(self, mode: int, guest_owned: bool, group_readable: bool = False) -> int:
        """The mode shown for a node: a guest's own entries as the guest has
        them; the mount's files masked by ``umask``; ``group_readable`` (the
        snapshot file) gains group read when the mount is shared."""
        if guest_owned or stat.S_ISLNK(mode):
            return mode  # a symlink's mode means nothing (and ls shows lrwxrwxrwx)
        if group_readable and self.shared:
            mode |= stat.S_IRGRP
        return mode & ~self.umask

    def gid(self, daemon_gid: int) -> int:
        """The group shown on the mount's own files."""
        return daemon_gid if self.shown_gid is None else self.shown_gid


def guest_allows(mode: int, want: int) -> bool:
    """Whether a guest entry of ``mode`` gives everyone (its "other" bits)
    the access ``want`` (``os.R_OK``, ``os.X_OK``): what a user who is not
    the mount's owner or root may do there. The guest's uids and groups
    name people on another system; a host user whose uid happens to equal
    one must not read that guest user's private files."""
    bits = (stat.S_IROTH if want & os.R_OK else 0) | (stat.S_IXOTH if want & os.X_OK else 0)
    return mode & bits == bits
