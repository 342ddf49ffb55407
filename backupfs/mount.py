"""Mounting: serve the filesystem until unmounted or signalled, then save state.

The lifecycle is one straight line: open the repository (its lock keeps a
second mount out), open the devices (their bitmaps are now "in use"),
mount, serve, and on the way out - however it comes - cancel running jobs,
unmount, close the repository (bitmaps persisted clean), remove the
mount record. ``REPO/mount.json`` tells other commands where it is mounted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from backupfs.fs import BackupOperations
from engine.errors import BackupfsError, UsageError
from engine.repo import Repository

log = logging.getLogger("backupfs.mount")

MOUNT_RECORD = "mount.json"
READ_AHEAD_KB = 1024  # 1 MiB buffered read requests instead of 128 KiB
ALLOWED_OPTIONS = {"allow_other", "allow_root", "default_permissions", "noatime", "ro", "rw", "nodev",
                   "nosuid", "dev", "suid", "exec", "noexec", "auto", "noauto", "user", "nouser",
                   "_netdev", "defaults"}
# Options that mount(8)/fstab carry but that mean nothing to the filesystem.
_FSTAB_ONLY = {"auto", "noauto", "user", "nouser", "_netdev", "defaults", "rw"}


class MountError(BackupfsError):
    pass


@dataclass(frozen=True)
class MountRecord:
    pid: int
    mountpoint: str
    repo: str


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
        if name in _FSTAB_ONLY or name.startswith("x-"):
            continue
        out.append(opt)
    return out


def check_mountpoint(repo_path: str, mountpoint: str) -> str:
    repo_real = os.path.realpath(repo_path)
    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.commonpath([mp, repo_real]) == repo_real:
        raise UsageError(f"mount point {mountpoint} lies inside the repository {repo_path}")
    if os.path.ismount(mp):
        raise UsageError(f"{mountpoint} is already a mount point")
    return mp


def read_mount_record(repo_path: str) -> MountRecord | None:
    """Where the repository is mounted, if the daemon that mounted it lives."""
    try:
        with open(os.path.join(repo_path, MOUNT_RECORD)) as f:
            data = json.load(f)
        rec = MountRecord(int(data["pid"]), str(data["mountpoint"]), str(data["repo"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(rec.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return rec if find_mount(rec.mountpoint) is not None else None


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(source, major:minor) of a backupfs mount at ``mountpoint``, from mountinfo.

    Never stats the mount point: from inside the daemon that would wait for
    the daemon itself, and a hung mount would hang the caller.
    """
    mp = os.path.normpath(os.path.abspath(mountpoint))
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        point = fields[4].encode().decode("unicode_escape")
        if point == mp and rfields[0] in ("fuse.backupfs", "fuse"):
            source = rfields[1].encode().decode("unicode_escape")
            return source, fields[2]
    return None


def _raise_read_ahead(device: str) -> None:
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.info("cannot raise read-ahead (%s): %s", path, e)


def serve(repo_path: str, mountpoint: str, options: list[str], ready: Callable[[str | None], None]) -> None:
    """Mount and serve until unmounted or signalled. ``ready(None)`` once
    serving, ``ready(message)`` if the mount could not be made."""
    try:
        mp = check_mountpoint(repo_path, mountpoint)
        repo = Repository.open(repo_path)
    except BackupfsError as e:
        ready(str(e))
        return
    ops = BackupOperations(repo, faults=os.environ.get("BACKUPFS_TEST_FAULTS"))
    for d in repo.devices():
        if not d.source:
            continue  # an imported archive: nothing live to track
        try:
            repo.device(d.name)
        except BackupfsError as e:
            log.warning("device %s is unavailable: %s", d.name, e)
    fuse_options = set(pyfuse3.default_options) | {f"fsname={repo.path}", "subtype=backupfs"} | set(options)
    try:
        pyfuse3.init(ops, mp, sorted(fuse_options))
    except (RuntimeError, OSError) as e:
        repo.close()
        ready(f"cannot mount {mountpoint}: {e}")
        return
    record_path = os.path.join(repo.path, MOUNT_RECORD)
    try:
        with open(record_path, "w") as f:
            json.dump({"pid": os.getpid(), "mountpoint": mp, "repo": repo.path}, f)
        found = find_mount(mp)
        if found is not None:
            _raise_read_ahead(found[1])
        trio.run(_main, repo, ready)
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            ops.close_views()
            repo.close()
            try:
                os.unlink(record_path)
            except FileNotFoundError:
                pass
            log.info("unmounted %s; bitmaps saved", mp)


async def _main(repo: Repository, ready: Callable[[str | None], None]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, repo)
        ready(None)
        log.info("serving %s", repo.path)
        # Returns when the kernel unmounts us or terminate() is called.
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _on_signals(repo: Repository) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            repo.cancel_jobs()
            pyfuse3.terminate()
            return


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` is gone (pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        import select

        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)
    finally:
        os.close(fd)

