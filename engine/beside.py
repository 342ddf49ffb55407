"""Reading a repository beside the process that holds its lock.

A mount's daemon (or a running backup or prune) holds the repository; the
commands that only look (`list`, `status`, `umount` after the daemon is
gone) read its files without the lock. Where those files lie is the
repository's business, so the CLI asks here instead of building paths.
"""

from __future__ import annotations

import os

from engine.bitmap import BitmapFileError, load_bitmap
from engine.catalog import Catalog
from engine.device import bitmap_path
from engine.errors import BackupfsError
from engine.layout import BITMAPS, CATALOG, device_dir


def read_catalog(repo: str) -> Catalog:
    """The catalog of the repository at ``repo``, opened read-only beside
    whoever holds the repository (the caller closes it)."""
    return Catalog.open(os.path.join(repo, CATALOG), readonly=True)


def bitmaps_left_in_use(repo: str) -> list[str]:
    """Devices whose bitmaps the daemon, now gone, left marked in use: it
    failed to save them at its end (a full disk, say). Told from the
    files themselves, since the daemon's exit status is not ours to see."""
    try:
        catalog = read_catalog(repo)
    except (OSError, BackupfsError):
        return []
    try:
        names = [d.name for d in catalog.devices() if d.source]
    finally:
        catalog.close()
    unsaved = []
    for name in names:
        for which in BITMAPS:
            try:
                in_use = load_bitmap(bitmap_path(device_dir(repo, name), which)).in_use
            except (OSError, BitmapFileError):
                continue  # none yet, or unreadable: the next open says so
            if in_use:
                unsaved.append(name)
                break
    return unsaved
