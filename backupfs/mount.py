"""Mounting: serve the filesystem until unmounted or signalled, then save state.

The lifecycle is one straight line: open the repository (its lock keeps a
second mount out), open the devices (their bitmaps are now "in use"),
mount, serve, and on the way out - however it comes - cancel running jobs,
unmount, close the repository (bitmaps persisted clean), remove the
mount record. ``REPO/mount.json`` tells other commands where it is mounted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import Any
from collections.abc import Callable

import pyfuse3
import trio

from backupfs.faults import operations
from backupfs.fs import BackupOperations
from backupfs.mountaccess import MountAccess
from backupfs.mountinfo import MOUNT_RECORD, check_mountpoint, check_sources_outside, our_options
from backupfs.relay import start_relay
from engine.chain import read_path
from engine.errors import BackupfsError
from engine.fsutil import atomic_write
from engine.repo import Repository

log = logging.getLogger("backupfs.mount")

# Whatever -o asked: a disk image in a backup may hold device nodes and
# setuid files, and nobody should get a device or root through the mount.
ALWAYS_OPTIONS = ("nosuid", "nodev")


def fsname_option(path: str) -> str:
    """The repository path as the value of FUSE's ``fsname=`` option.

    libfuse splits its options at commas and reads backslash escapes, and
    pyfuse3 hands them over as ASCII: a repository named ``r,allow_other``
    would add an option, a non-ASCII name would stop the mount. Every byte
    of the path but plain printable ASCII is written as a ``\\ooo`` octal
    escape (``,`` and ``\\`` too), which libfuse turns back into that byte,
    so the mount's source in mountinfo is the path itself.
    """
    out = []
    for byte in os.fsencode(path):
        if 0x20 < byte < 0x7F and byte not in b",\\":
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def serve(repo_path: str, mountpoint: str, options: list[str], ready: Callable[[str | None], None]) -> None:
    """Mount and serve until unmounted or signalled. ``ready(None)`` once
    serving, ``ready(message)`` if the mount could not be made."""
    with contextlib.ExitStack() as cleanup:
        try:
            mp = check_mountpoint(repo_path, mountpoint)
            repo = Repository.open(repo_path)
        except BackupfsError as e:
            ready(str(e))
            return
        cleanup.callback(repo.close)
        try:
            check_sources_outside(mp, {d.name: d.source for d in repo.devices()})
        except BackupfsError as e:
            ready(str(e))
            return
        if repo.frozen:
            ready(f"{repo.path}: {repo.frozen}, and a mount must record its state there; free some "
                  "space on that disk first (list, status, verify and restore work without a mount)")
            return
        # The read-ahead is raised at the first open of a backup, not here: the
        # kernel caps it to what FUSE INIT negotiated, and INIT is answered only
        # once serving starts (a value written now would be cut back to 128 KiB).
        given = list(options)
        ours, options = our_options(options)
        access = MountAccess.from_options(ours)
        if access.shared and "allow_other" not in options:
            options.append("allow_other")  # FUSE lets nobody but the mounter in without it
        refused = allow_other_refused(options)
        if refused:
            ready(refused)
            return
        ops = operations(repo, mp, files_owner_only="files_owner_only" in ours, access=access)
        for d in repo.devices():
            if not d.source:
                continue  # an imported archive: nothing live to track
            try:
                repo.device(d.name)
            except BackupfsError as e:
                log.warning("device %s is unavailable: %s", d.name, e)
        log.info("backups are read by the %s read loop", read_path())
        fuse_options = (set(pyfuse3.default_options) | set(options) | set(ALWAYS_OPTIONS)
                        | {f"fsname={fsname_option(repo.path)}", "subtype=backupfs"})
        try:
            pyfuse3.init(ops, mp, sorted(fuse_options))
        except (RuntimeError, OSError) as e:
            ready(f"cannot mount {mountpoint}: {e}")
            return
        # Mounted: on the way out (last registered runs first) unmount,
        # close the views, close the repository, and only then remove the
        # mount record. The plain close registered above is dropped for
        # _close_repo, which must run before the record goes.
        record_path = os.path.join(repo.path, MOUNT_RECORD)
        cleanup.pop_all()
        cleanup.callback(_remove_record, record_path)
        cleanup.callback(_close_repo, repo, mp)
        cleanup.callback(ops.close_views)
        cleanup.callback(pyfuse3.close, unmount=True)
        # Before pyfuse3.close (callbacks run last first): the relay's threads
        # stop and pyfuse3 gets its FUSE device back to unmount and close.
        ops.relay = start_relay(ops.relay_read)
        if ops.relay is not None:
            cleanup.callback(ops.stop_relay)
        # Replaced, never written through: a symlink planted as mount.json
        # must not make us overwrite the file it points to.
        try:
            atomic_write(record_path, json.dumps({"pid": os.getpid(), "mountpoint": mp, "repo": repo.path,
                                                 "options": given}).encode())
        except OSError as e:
            ready(f"cannot mount {mountpoint}: cannot write {record_path}: {e.strerror}")
            return
        trio.run(_main, repo, ready, ops)


FUSE_CONF = "/etc/fuse.conf"


def allow_other_refused(options: list[str], conf: str = FUSE_CONF, euid: int | None = None) -> str | None:
    """Why FUSE will refuse ``allow_other`` to this (non-root) mounter, or None.

    fusermount3 grants it to a user other than root only when fuse.conf has
    a ``user_allow_other`` line, and otherwise says only that the option is
    not allowed: said here with the way out.
    """
    if "allow_other" not in options or (os.geteuid() if euid is None else euid) == 0:
        return None
    try:
        with open(conf) as f:
            if any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f):
                return None
    except OSError:
        pass
    return (f"allow_other (which allow_group= and gid= need) is for root only unless {conf} has a line "
            "'user_allow_other': ask the administrator to add it, or mount as root")


def _close_repo(repo: Repository, mountpoint: str) -> None:
    """Close the repository after an unmount: its bitmaps are saved clean."""
    repo.close()
    log.info("unmounted %s; bitmaps saved", mountpoint)


def _remove_record(record_path: str) -> None:
    try:
        os.unlink(record_path)
    except FileNotFoundError:
        pass


async def _main(repo: Repository, ready: Callable[[str | None], None], ops: BackupOperations) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, repo, ops)
        nursery.start_soon(_drop_idle_files, ops)
        nursery.start_soon(_load_parsers)
        if ops.relay is not None:
            nursery.start_soon(_on_relay_end, ops.relay)
        ready(None)
        log.info("serving %s", repo.path)
        # Returns when the kernel unmounts us or terminate() is called.
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _on_relay_end(relay: Any) -> None:
    """The kernel ended the connection (an unmount from outside): end
    pyfuse3's loop, as its own read of the device did on ENODEV."""
    await trio.lowlevel.wait_readable(relay.ended_fd)
    pyfuse3.terminate()


async def _load_parsers() -> None:
    """The guest parsers, imported once the mount serves (engine/guest/disk.py load_parsers)."""
    from engine.guest.disk import load_parsers

    started = time.monotonic()
    await trio.to_thread.run_sync(load_parsers)
    log.info("guest filesystem parsers loaded in %.2f s", time.monotonic() - started)


async def _drop_idle_files(ops: Any) -> None:
    """Close the guest disks nobody used for a while (their parsed volumes
    and listings), even when no later request comes to notice it."""
    while True:
        await trio.sleep(60)
        await trio.to_thread.run_sync(ops.files.disks.evict_idle)


async def _on_signals(repo: Repository, ops: BackupOperations) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            reason = f"the mount daemon received {signal.Signals(signum).name} and is unmounting"
            repo.cancel_jobs(reason)
            ops.control.cancel(reason)  # an import through MOUNT/.control
            pyfuse3.terminate()
            return


