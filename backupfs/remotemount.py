"""Mounting a remote: `backupfs mount s3://BUCKET/PREFIX MOUNT [--endpoint URL] [-o cache=DIR,cache_size=10G]`.

One straight line, as a local mount's (backupfs/mount.py): read the
remote's catalog (the newest complete snapshot, once: a later push is seen
after a remount), open the object cache (its directory locked: one mount a
cache), mount read-only, serve until unmounted or signalled, then close the
views and save the cache's records. The remote is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal

import pyfuse3
import trio

from backupfs.mount import ALWAYS_OPTIONS, _drop_idle_files, _load_parsers, _on_relay_end, allow_other_refused
from backupfs.relay import start_relay
from backupfs.mountinfo import MOUNT_RECORD, check_mountpoint, runtime_record, write_runtime_record
from backupfs.remotefs import RemoteOperations
from collections.abc import Callable
from engine.chain import read_path
from engine.errors import BackupfsError, UsageError
from engine.fsutil import atomic_write
from engine.remote.location import parse_s3_url, validate_endpoint
from engine.remote.objcache import MIN_CACHE, ObjectCache, default_cache_dir, private_dir
from engine.remote.remotecatalog import read_store_catalog
from engine.remote.remoterepo import RemoteRepository
from engine.remote.store import RemoteStore, env_read_timeout
from engine.units import format_size, parse_size

log = logging.getLogger("backupfs.mount")

CACHE_SIZE = 10 << 30
# A mount's reads give up sooner than a push's: a reader waits on EIO, not on a
# retry loop (3 attempts of up to READ_TIMEOUT s each, plus connecting).
READ_TIMEOUT = 10.0
ATTEMPTS = 2


def read_timeout() -> float:
    """READ_TIMEOUT, or BACKUPFS_S3_READ_TIMEOUT (1-300 s) where a test or an
    administrator wants a frozen endpoint noticed sooner or later."""
    return env_read_timeout(READ_TIMEOUT)
REMOTE_OPTIONS = ("cache", "cache_size")
FLAG_OPTIONS = ("files_owner_only",)  # ours, as a local mount's: the guest's files are the owner's alone
FUSE_OPTIONS = {"allow_other", "allow_root", "default_permissions", "noatime", "ro"}


def split_options(options: list[str]) -> tuple[dict[str, str], list[str]]:
    """-o of a remote mount: (cache, cache_size, files_owner_only) and the FUSE options it allows."""
    ours: dict[str, str] = {}
    fuse: list[str] = []
    for opt in options:
        name, eq, value = opt.partition("=")
        if name in FLAG_OPTIONS and not eq:
            ours[name] = ""
        elif name in REMOTE_OPTIONS and eq and value:
            ours[name] = value
            if name == "cache_size" and parse_size(value, "cache_size") < MIN_CACHE:
                raise UsageError(f"cache_size {value} is below the smallest cache ({MIN_CACHE >> 20}M)")
        elif name in FUSE_OPTIONS and not eq:
            fuse.append(name)
        else:
            raise UsageError(f"mount option {opt!r} is not one a remote mount takes "
                             f"(cache=DIR, cache_size=SIZE, {', '.join(sorted(FUSE_OPTIONS | set(FLAG_OPTIONS)))})")
    return ours, fuse


def cache_dir_for(url: str, endpoint: str | None) -> str:
    """The default cache of a remote: its own directory under the user's cache."""
    tag = hashlib.sha256(f"{endpoint or ''} {url}".encode()).hexdigest()[:16]
    return os.path.join(default_cache_dir(), f"remote-{tag}")


def log_path(url: str, endpoint: str | None, options: list[str]) -> str:
    """Where the daemon logs: beside its cache (the remote has no directory of ours)."""
    ours, _ = split_options(options)
    # The cache's own check first (ours, 0700): -o cache=DIR may name another user's
    # directory, and nothing of ours (this log) may be written there.
    directory = private_dir(ours.get("cache") or cache_dir_for(url, endpoint))
    return os.path.join(directory, "backupfs.log")


def serve_remote(url: str, endpoint: str | None, mountpoint: str, options: list[str],
                 ready: Callable[[str | None], None]) -> None:
    """Mount the remote at ``url`` read-only and serve until unmounted or signalled."""
    with contextlib.ExitStack() as cleanup:
        try:
            ours, fuse = split_options(options)
            location = parse_s3_url(url)
            limit = parse_size(ours.get("cache_size", str(CACHE_SIZE)), "cache_size")
            directory = ours.get("cache") or cache_dir_for(location.url, endpoint)
            mp = check_mountpoint(directory, mountpoint)
            store = RemoteStore(f"remote {location.url}", location, validate_endpoint(endpoint),
                                read_timeout=read_timeout(), attempts=ATTEMPTS)
            catalog, listing = read_store_catalog(store)
            cache = ObjectCache(store, directory, limit)
        except BackupfsError as e:
            ready(str(e))
            return
        repo = RemoteRepository(store, catalog, listing, cache)
        cleanup.callback(repo.close)
        refused = allow_other_refused(fuse)
        if refused:
            ready(refused)
            return
        ops = RemoteOperations(repo, mp, files_owner_only="files_owner_only" in ours)
        fuse_options = (set(pyfuse3.default_options) | set(fuse) | set(ALWAYS_OPTIONS)
                        | {"ro", f"fsname={_fsname(location.url)}", "subtype=backupfs"})
        log.info("backups are read by the %s read loop, through the cache %s (%s at most)", read_path(),
                 cache.directory, format_size(limit))
        try:
            pyfuse3.init(ops, mp, sorted(fuse_options))
        except (RuntimeError, OSError) as e:
            ready(f"cannot mount {mountpoint}: {e}")
            return
        # The record (who serves, where) lives beside the cache: the remote is not ours to write.
        record = os.path.join(cache.directory, MOUNT_RECORD)
        cleanup.callback(_remove, record)
        cleanup.callback(ops.close_views)
        cleanup.callback(pyfuse3.close, unmount=True)
        # Before pyfuse3.close (callbacks run last first), as a local mount's.
        ops.relay = start_relay(ops.relay_read)
        if ops.relay is not None:
            cleanup.callback(ops.stop_relay)
        doc = json.dumps({"pid": os.getpid(), "mountpoint": mp, "repo": location.url, "options": options}).encode()
        atomic_write(record, doc)
        try:
            cleanup.callback(_remove, write_runtime_record(mp, doc))
        except OSError as e:  # umount then returns without waiting for the daemon
            log.warning("cannot record the mount in %s: %s", e.filename or runtime_record(mp), e.strerror)
        trio.run(_main, location.url, ready, cache, ops)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsname(url: str) -> str:
    """The URL as FUSE's fsname= (no comma or backslash: parse_s3_url allows neither
    in a bucket; any other byte is escaped as backupfs/mount.py does)."""
    from backupfs.mount import fsname_option

    return fsname_option(url)


async def _main(url: str, ready: Callable[[str | None], None], cache: ObjectCache,
                ops: RemoteOperations) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals)
        nursery.start_soon(_load_parsers)  # the files view's, as a local mount loads them
        nursery.start_soon(_drop_idle_files, ops)
        if ops.relay is not None:
            nursery.start_soon(_on_relay_end, ops.relay)
        ready(None)
        log.info("serving %s (its catalog as read now: a later push is seen after a remount)", url)
        await pyfuse3.main()
        log.info("unmounted %s; fetched %d bytes in %d GETs, %d reads from the cache", url,
                 cache.stats["bytes"], cache.stats["gets"], cache.stats["hits"])
        nursery.cancel_scope.cancel()


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
