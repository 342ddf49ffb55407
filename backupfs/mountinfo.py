"""Where a repository is mounted, and the rules for mount points and options.

Kept apart from the daemon (backupfs/mount.py) so that commands which only
need to find a mount do not import pyfuse3 and trio.
"""

from __future__ import annotations

import json
import errno
import hashlib
import os
import re
import select
import stat
import tempfile
from dataclasses import dataclass

from backupfs.mountaccess import VALUE_OPTIONS, check_value
from engine.ceph import is_rbd
from engine.errors import BackupfsError, UsageError
from engine.fsutil import atomic_write

MOUNT_RECORD = "mount.json"
# Access times: the mount keeps none, so every atime option of fstab means
# the same here (noatime alone is handed on, as before).
_ATIME = {"atime", "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime",
          "lazytime", "nolazytime"}
ALLOWED_OPTIONS = {"allow_other", "allow_root", "default_permissions", "noatime", "ro", "rw", "nodev",
                   "nosuid", "dev", "suid", "exec", "noexec", "auto", "noauto", "user", "nouser",
                   "_netdev", "defaults", "nofail"} | _ATIME | {"files_owner_only"} | set(VALUE_OPTIONS)
# Options that are ours, not FUSE's: the daemon takes them out (backupfs/mount.py).
# allow_group=G, gid=G, umask=M: who besides the owner gets in (backupfs/mountaccess.py).
OUR_OPTIONS = {"files_owner_only"} | set(VALUE_OPTIONS)
# Options that would undo nosuid,nodev, which every mount has (backupfs/mount.py).
_REFUSED = {"suid", "dev"}
# Options that mount(8)/fstab carry but that mean nothing to the filesystem.
_FSTAB_ONLY = {"auto", "noauto", "user", "nouser", "_netdev", "defaults", "rw", "nofail"} | _ATIME


@dataclass(frozen=True)
class MountRecord:
    pid: int
    mountpoint: str
    repo: str
    options: tuple[str, ...] = ()  # as given to `mount -o` (checked), for status and the listing


def our_options(options: list[str]) -> tuple[list[str], list[str]]:
    """``options`` split into ours (OUR_OPTIONS, taken out by the daemon) and FUSE's."""
    ours = [o for o in options if o.split("=", 1)[0] in OUR_OPTIONS]
    return ours, [o for o in options if o.split("=", 1)[0] not in OUR_OPTIONS]


def parse_options(text: str | None) -> list[str]:
    """`-o a,b,c` into FUSE options; refuse what we do not know by name."""
    out: list[str] = []
    for opt in (text or "").split(","):
        opt = opt.strip()
        if not opt:
            continue
        name = opt.split("=", 1)[0]
        if name not in ALLOWED_OPTIONS and not name.startswith("x-"):
            raise UsageError(
                f"unknown mount option {opt!r} (known: {', '.join(sorted(ALLOWED_OPTIONS))})"
            )
        if name in _REFUSED:
            raise UsageError(f"mount option {opt!r} is refused: a backupfs mount is always nosuid,nodev "
                             "(the disks it shows may hold device files and setuid programs)")
        if name in _FSTAB_ONLY or name.startswith("x-"):
            continue
        if name in VALUE_OPTIONS:
            out.append(f"{name}={check_value(name, opt.partition('=')[2])}")
            continue
        if opt != name:  # FUSE itself would only say "fuse_session_new() failed"
            raise UsageError(f"mount option {name!r} takes no value (got {opt!r}; use -o {name})")
        out.append(opt)
    return out


def check_mountpoint(repo_path: str, mountpoint: str) -> str:
    _refuse_strangers_link(mountpoint)
    repo_real = os.path.realpath(repo_path)
    mp = os.path.realpath(mountpoint)
    try:
        os.stat(mp)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # a FUSE mount whose daemon died (kill -9)
            raise UsageError(f"{mountpoint} is a dead mount (its daemon is gone); "
                             f"run 'backupfs umount {mountpoint}' first") from None
    if not os.path.exists(mp):
        raise UsageError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.commonpath([mp, repo_real]) == repo_real:
        raise UsageError(f"mount point {mountpoint} lies inside the repository {repo_path}")
    # The other way round the mount hides the repository from the daemon
    # itself: its first write there would wait for its own answer, forever.
    if os.path.commonpath([mp, repo_real]) == mp:
        raise UsageError(f"mount point {mountpoint} contains the repository {repo_path}; "
                         "the mount would hide it (mount elsewhere)")
    if os.path.ismount(mp):
        raise UsageError(f"{mountpoint} is already a mount point")
    return mp


def _refuse_strangers_link(mountpoint: str) -> None:
    """Refuse a mount point that is a symlink someone else made or can change:
    followed, it would have root mount the repository over the directory of
    their choosing (/etc, say), hiding it. An administrator's link (root's,
    in a directory only root can change) is followed, as before."""
    from engine.sourceid import trusted_link

    name = mountpoint.rstrip("/") or "/"  # "link/" would look through the link
    try:
        st = os.lstat(name)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) and not trusted_link(name, st):
        try:
            points = os.readlink(name)
        except OSError:
            points = "?"
        raise UsageError(f"mount point {mountpoint} is a symlink (to {points}) that another user made or can "
                         "change; give the directory itself")


def check_sources_outside(mountpoint: str, sources: dict[str, str]) -> None:
    """Refuse a mount point that holds a device's source (``sources``: name
    -> path): mounted over, the source would be read through the mount
    itself, and the first access would hang the whole filesystem."""
    mp = os.path.realpath(mountpoint)
    for name, source in sorted(sources.items()):
        if source and not is_rbd(source) and os.path.commonpath([mp, os.path.realpath(source)]) == mp:
            raise UsageError(f"device {name}'s source {source} lies under the mount point {mountpoint}; "
                             "the mount would hide it (mount elsewhere)")


def trigger_file(record: MountRecord, device: str) -> str:
    """The device's snapshot file on the mount, which must answer.

    Right after its daemon is killed the mount is still listed, and the
    daemon may not have been reaped yet: every look at it says ENOTCONN,
    which must not read as "no such device".
    """
    snapshot = os.path.join(record.mountpoint, device, "snapshot")
    try:
        os.stat(snapshot)
    except FileNotFoundError:
        raise UsageError(f"no device named {device!r}") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise dead_mount_error(record) from None
        raise UsageError(f"{snapshot}: {e.strerror}") from None
    return snapshot


def _load_record(repo_path: str) -> MountRecord | None:
    try:
        with open(os.path.join(repo_path, MOUNT_RECORD)) as f:
            data = json.load(f)
        options = data.get("options", [])  # a daemon of an older version records none
        if not isinstance(options, list):
            options = []
        return MountRecord(int(data["pid"]), str(data["mountpoint"]), str(data["repo"]),
                           tuple(str(o) for o in options))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dead_mount(repo_path: str) -> str | None:
    """The mount point of the repository's mount whose daemon is gone
    (kill -9 leaves it listed, answering ENOTCONN), if there is one."""
    rec = _load_record(repo_path)
    if rec is None or read_mount_record(repo_path) is not None:
        return None
    return rec.mountpoint if find_mount(rec.mountpoint) is not None else None


def dead_mount_error(record: MountRecord) -> UsageError:
    """What a command that goes through the mount says when its daemon is gone."""
    return UsageError(f"{record.mountpoint} is a dead mount (its daemon, pid {record.pid}, is gone); "
                      f"run 'backupfs umount {record.mountpoint}' first")


def refuse_dead_mount(repo: str, record: MountRecord, then: str) -> None:
    """A live daemon whose mount answers ENOTCONN (its FUSE connection
    aborted) cannot be read through: say so and what to run, then ``then``."""
    try:
        os.stat(record.mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise BackupfsError(f"{repo} is mounted at {record.mountpoint}, a dead mount (its daemon is "
                                f"gone); run 'backupfs umount {record.mountpoint}', then {then}") from None


def _living(rec: MountRecord | None) -> MountRecord | None:
    """The record, if the daemon it names still runs (another user's counts)."""
    if rec is None:
        return None
    try:
        os.kill(rec.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return rec


def read_mount_record(repo_path: str) -> MountRecord | None:
    """Where the repository is mounted, if the daemon that mounted it lives."""
    rec = _living(_load_record(repo_path))
    return rec if rec is not None and find_mount(rec.mountpoint) is not None else None


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(source, major:minor) of a backupfs mount at ``mountpoint``, from mountinfo.

    Never stats the mount point: from inside the daemon that would wait for
    the daemon itself, and a hung mount would hang the caller.
    """
    mp = os.path.normpath(os.path.abspath(mountpoint))
    for point, source, device in _backupfs_mounts():
        if point == mp:
            return source, device
    return None


def _backupfs_mounts() -> list[tuple[str, str, str]]:
    """(mount point, source, major:minor) of each backupfs mount, from mountinfo."""
    return [(point, source, device) for point, source, device, _ in _backupfs_mounts_typed()]


def _backupfs_mounts_typed() -> list[tuple[str, str, str, str]]:
    """``_backupfs_mounts`` with each mount's type ("fuse.backupfs", or "fuse")."""
    return [(point, source, device, fstype) for point, source, device, fstype, _ in _backupfs_mounts_owned()]


def _backupfs_mounts_owned() -> list[tuple[str, str, str, str, int | None]]:
    """``_backupfs_mounts_typed`` with the uid of whoever mounted each (FUSE's
    ``user_id=`` among the super options), None if not shown."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = [os.fsdecode(line) for line in f]
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) >= 5 and len(rfields) >= 2 and rfields[0] in ("fuse.backupfs", "fuse"):
            owner = None
            for opt in (rfields[2] if len(rfields) > 2 else "").split(","):
                if opt.startswith("user_id=") and opt[8:].isdigit():
                    owner = int(opt[8:])
            out.append((_unescape(fields[4]), _unescape(rfields[1]), fields[2], rfields[0], owner))
    return out


def listed_mounts() -> list[tuple[str, str, MountRecord | None, int | None]]:
    """(mount point, repository, its record if its daemon lives, the uid of
    the user who mounted it when that is someone else and no record is
    readable) of each backupfs mount, for `backupfs mount` with no arguments.
    A plain "fuse" mount counts only when its source is a directory (another
    program's export is not ours); a remote's (``fuse.backupfs``, its source
    the s3:// URL) by its daemon's runtime record, which only its mounter
    finds: another user's is theirs, not a dead mount."""
    out = []
    for point, source, _, fstype, owner in _backupfs_mounts_owned():
        if fstype == "fuse.backupfs" and source.startswith(S3_SCHEME):
            rec = remote_mount_record(point)
        elif not os.path.isdir(source):
            continue
        else:
            rec = read_mount_record(source)
            rec = rec if rec is not None and rec.mountpoint == point else None
        stranger = owner if rec is None and owner is not None and owner != os.geteuid() else None
        out.append((point, source, rec, stranger))
    return out


S3_SCHEME = "s3://"


def runtime_record(mountpoint: str) -> str:
    """Where `umount` and `mount` (listing) find a remote mount's daemon (the remote has
    no directory of ours to hold it): a file per mount point in the user's runtime directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else tempfile.gettempdir())
    directory = os.path.join(base, f"backupfs-{os.geteuid()}")
    tag = hashlib.sha256(os.fsencode(os.path.normpath(mountpoint))).hexdigest()[:32]
    return os.path.join(directory, f"remote-mount-{tag}.json")


def remote_daemon(mountpoint: str) -> int | None:
    """The pid of the daemon serving a remote mount at ``mountpoint``, if recorded."""
    rec = _load_remote_record(mountpoint)
    return None if rec is None else rec.pid


def remote_mount_record(mountpoint: str) -> MountRecord | None:
    """A remote mount's record (its URL as ``repo``), if its daemon lives."""
    return _living(_load_remote_record(mountpoint))


RUNTIME_RECORD_MAX = 64 * 1024  # a record is a few hundred bytes; a bigger file is not one


def _ours_alone(st: os.stat_result) -> bool:
    """Made by us, and changeable by no one else: a runtime directory may be
    /tmp/backupfs-<uid>, a name any local user can take first."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def write_runtime_record(mountpoint: str, doc: bytes) -> str:
    """Record a remote mount's daemon where `umount` and the listing look
    (``runtime_record``); its path. OSError when the directory is someone
    else's or others may change it: a record there could be swapped for theirs."""
    path = runtime_record(mountpoint)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or not _ours_alone(st):
        raise OSError(errno.EPERM, "the directory is not ours alone (uid "
                      f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})", directory)
    atomic_write(path, doc)
    return path


def _load_remote_record(mountpoint: str) -> MountRecord | None:
    """The record, if it and its directory are ours alone and it is one: a
    stranger's (planted in a /tmp directory they took first) would have the
    listing print their pid and options and `umount` wait for their
    process; a FIFO would hang both (hence O_NONBLOCK), a link lead elsewhere."""
    path = runtime_record(mountpoint)
    try:
        if not _ours_alone(os.lstat(os.path.dirname(path))):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or not _ours_alone(st) or st.st_size > RUNTIME_RECORD_MAX:
                return None
            data = json.loads(f.read(RUNTIME_RECORD_MAX))
        if data.get("mountpoint") != os.path.normpath(mountpoint):
            return None
        options = data.get("options", [])
        if not isinstance(options, list):
            options = []
        pid = int(data["pid"])
        if pid <= 0:
            return None
        return MountRecord(pid, str(data["mountpoint"]), str(data["repo"]), tuple(str(o) for o in options))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def mount_holding(path: str) -> tuple[str, str] | None:
    """(mount point, path inside it) when ``path`` (or, if it does not
    exist, its directory) lies on a backupfs mount, else None.

    Told by the device number, as mountinfo lists it: a FUSE mount's files
    all share its anonymous device. ``path`` is resolved first (a symlink
    into a mount is in the mount).
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        try:
            st = os.stat(os.path.dirname(real))
        except OSError:
            return None
    except OSError:
        return None
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for point, source, dev in _backupfs_mounts():
        # A plain "fuse" mount is ours only if its source is a repository
        # directory: a qemu-storage-daemon export, say, is a fine target.
        if dev == device and os.path.isdir(source):
            return point, os.path.relpath(real, point)
    return None


def _unescape(field: str) -> str:
    """A mountinfo field: the kernel writes space, tab, newline and backslash
    as octal escapes (\\040) and every other byte as it is, UTF-8 included
    (decoding the field as a Python escape string mangled a non-ASCII name)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


_OCTAL = re.compile(r"\\([0-7]{3})")


# 1 MiB buffered read requests instead of 128 KiB (FUSE caps a request at
# 1 MiB), and up to four of them in flight for a sequential reader: with
# 4096 instead of 1024, cold buffered `dd` of a backup (bench chain, caches
# dropped, 3 A/B pairs) went from 682-1029 to 835-1244 MB/s at depth 1 and
# from 600-729 to 677-805 at depth 64; depth 8 stayed at 959-1050.
READ_AHEAD_KB = 4096


def raise_read_ahead(device: str) -> None:
    """Raise the kernel's read-ahead of a mount's bdi (``major:minor``); root only."""
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError:
        pass  # not root, or no such bdi: buffered reads stay at 128 KiB


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` is gone (pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)
    finally:
        os.close(fd)

