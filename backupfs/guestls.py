"""What `backupfs ls` prints: volumes and guest entries, as text lines or JSON objects.

Text is for people: every name goes through ``escape`` (a guest's name
with a newline or an ESC sequence cannot forge a line or drive the
terminal). JSON is for programs, so it must give back the exact bytes:
``name``, ``path`` and ``target`` are the guest's text when it is valid
UTF-8 (JSON escapes control characters itself), and otherwise the escaped
text plus ``name_b64`` / ``path_b64`` / ``target_b64`` holding the raw
bytes in base64. ``mode`` is the permission bits as a number (``type``
says the rest), times are nanoseconds since the epoch, UTC.
"""

from __future__ import annotations

import base64
import os
import stat
import time
from typing import Any

from engine.guest.disk import VolumeInfo
from engine.guest.guestfs import GuestEntry
from engine.text import escape

from backupfs.guestwalk import kind_of


def volume_line(info: VolumeInfo, long: bool) -> str:
    """One volume: its name, and with ``-l`` where it lies and what it holds."""
    if not long:
        return escape(info.name)
    state = f"{info.state}: {info.reason}" if info.reason else info.state
    return "\t".join([escape(info.name), str(info.offset), str(info.size), escape(info.fstype) or "-",
                      escape(info.label) or "-", escape(state)])


def volume_json(info: VolumeInfo) -> dict[str, Any]:
    return {"name": info.name, "path": info.name, "type": "volume", "offset": info.offset, "size": info.size,
            "fstype": info.fstype, "label": info.label, "state": info.state, "reason": info.reason}


def iso_utc(ns: int) -> str:
    """A guest time as ISO 8601 UTC, to the second (as `list` shows times)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return "?"  # a crafted time past what the host's calendar holds


def entry_line(name: bytes, entry: GuestEntry, long: bool, target: bytes | None) -> str:
    """One entry, as `ls` or `ls -l` shows it (numeric owners, time in UTC)."""
    text = escape(name.decode("utf-8", "surrogateescape"))
    if not long:
        return text
    size = (f"{os.major(entry.rdev)},{os.minor(entry.rdev)}"
            if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode) else str(entry.size))
    line = " ".join([stat.filemode(entry.mode), str(entry.nlink), str(entry.uid), str(entry.gid), size,
                     iso_utc(entry.mtime_ns), text])
    if target is not None:
        line += " -> " + escape(target.decode("utf-8", "surrogateescape"))
    return line


def _text_field(out: dict[str, Any], key: str, raw: bytes) -> None:
    """``key`` as exact text, or escaped text plus ``key_b64`` when not UTF-8."""
    try:
        out[key] = raw.decode("utf-8")
    except UnicodeDecodeError:
        out[key] = escape(raw.decode("utf-8", "surrogateescape"))
        out[key + "_b64"] = base64.b64encode(raw).decode("ascii")


def entry_json(name: bytes, path: bytes, entry: GuestEntry, target: bytes | None) -> dict[str, Any]:
    """One entry for ``--json``; ``path`` is from the volume's name (``p2/etc/fstab``)."""
    out: dict[str, Any] = {}
    _text_field(out, "name", name)
    _text_field(out, "path", path)
    out.update({"type": kind_of(entry.mode), "mode": stat.S_IMODE(entry.mode), "uid": entry.uid,
                "gid": entry.gid, "size": entry.size, "nlink": entry.nlink,
                "mtime": None if (when := iso_utc(entry.mtime_ns)) == "?" else when, "mtime_ns": entry.mtime_ns})
    if target is not None:
        _text_field(out, "target", target)
    if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
        out["rdev_major"], out["rdev_minor"] = os.major(entry.rdev), os.minor(entry.rdev)
    return out
