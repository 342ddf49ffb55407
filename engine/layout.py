"""Where a repository keeps what, and how backups are named: the one owner.

Layout of a repository directory::

    catalog.db              SQLite catalog (devices, backups, jobs)
    lock                    fcntl lock, holds the owner's pid
    devices/<name>/
        <id>.qcow2          one image per backup; backing file = parent's image
        <id>.sums           per-granule checksums of what the backup captured
        since-last.bitmap   dirty since the previous backup
        since-full.bitmap   dirty since the last full
        .tmp-<id>.qcow2     a job's image until it is complete (removed at open)

The catalog records paths relative to the repository (``devices/NAME/FILE``)
and recovery removes only files of that shape: every name is made here, so
that a backup, an import, a prune and recovery agree on them.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

CATALOG = "catalog.db"
LOCK = "lock"
DEVICES = "devices"
# A device's two dirty bitmaps (see engine/device.py), by the stem of their file names.
BITMAPS = ("since-last", "since-full")

# A backup's id: a file name in the mount and the stem of its image's name.
# Ours are ID_FORMAT's; an older or imported catalog may hold any id this
# rule allows, so reading checks this, not the format.
BACKUP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The id a backup gets: when it was taken (UTC), the catalog's sequence
# number, its kind. Sorting ids sorts by time, then by sequence.
ID_STAMP = "%Y%m%dT%H%M%SZ"


def backup_id(created_ns: int, seq: int, kind: str) -> str:
    """The id of a new backup: ``20261206T124800Z-0042-incremental``."""
    stamp = time.strftime(ID_STAMP, time.gmtime(created_ns / 1e9))
    return f"{stamp}-{seq:04d}-{kind}"


def matching_ids(typed: str, ids: list[str]) -> list[str]:
    """The ids ``typed`` names, as people type them: the whole id, or a suffix after
    the timestamp (``0042``, ``0042-incremental``; the sequence number is the catalog's,
    unique within a device, so a suffix names one backup of one device)."""
    if typed in ids:
        return [typed]
    out = []
    for ident in ids:
        _, dash, rest = ident.partition("-")
        if dash and (rest == typed or rest.startswith(typed + "-")):
            out.append(ident)
    return out


def device_rel(name: str) -> str:
    """A device's directory as the catalog records it: ``devices/NAME``."""
    return f"{DEVICES}/{name}"


def device_dir(root: str, name: str) -> str:
    """A device's directory: its images, checksums and bitmaps."""
    return os.path.join(root, DEVICES, name)


def file_rel(name: str, file: str) -> str:
    """A file of a device as the catalog records it: ``devices/NAME/FILE``."""
    return f"{DEVICES}/{name}/{file}"


def image_name(ident: str) -> str:
    """The image of backup ``ident``, and the backing file name its children record."""
    return f"{ident}.qcow2"


def sums_name(ident: str) -> str:
    return f"{ident}.sums"


def tmp_image_name(ident: str) -> str:
    """A job's image until it is complete: hidden, and never a backup's name."""
    return f".tmp-{ident}.qcow2"


def merge_names(ident: str) -> tuple[str, str]:
    """(image, checksums) of a prune's rewrite of child ``ident``, until they replace the child's."""
    return f".tmp-merge-{ident}.qcow2", f".tmp-merge-{ident}.sums"


def bitmap_name(which: str) -> str:
    """``since-last.bitmap``: a bitmap of BITMAPS, persisted."""
    return f"{which}.bitmap"


def bitmap_tmp_name(which: str) -> str:
    """The fixed temporary name a bitmap is saved under before its rename (fsutil.atomic_write)."""
    return f"{which}.bitmap.tmp"


@dataclass(frozen=True)
class BackupFiles:
    """The files one new backup is made of, absolute and as the catalog records them."""

    root: str
    device: str
    ident: str

    @property
    def dir(self) -> str:
        return device_dir(self.root, self.device)

    @property
    def tmp(self) -> str:
        return os.path.join(self.dir, tmp_image_name(self.ident))

    @property
    def image(self) -> str:
        return os.path.join(self.dir, image_name(self.ident))

    @property
    def sums(self) -> str:
        return os.path.join(self.dir, sums_name(self.ident))

    @property
    def image_rel(self) -> str:
        return file_rel(self.device, image_name(self.ident))

    @property
    def sums_rel(self) -> str:
        return file_rel(self.device, sums_name(self.ident))

    def intents(self) -> list[str]:
        """Every file it makes, relative: recorded before they exist, so a
        crash's recovery removes these (and only these)."""
        return [file_rel(self.device, tmp_image_name(self.ident)), self.image_rel, self.sums_rel]
