"""What a remote holds, by key relative to its prefix, and its catalog's format.

::

    backupfs-remote.json            {"format": 1}
    lock/0000000012.json            the writer's lock: numbered write-once objects, the
                                    newest is the lock's state (engine/remote/lock.py)
    catalog/0000000007.json         numbered write-once catalog snapshots; the newest
                                    complete one that parses is the catalog
    devices/<dev>/<id>.qcow2        a backup's image, as pushed first
    devices/<dev>/<id>.sums         its checksums
    devices/<dev>/<id>.r<N>.qcow2   the image again after a local prune rewrote it
    devices/<dev>/<id>.r<N>.sums    (and its checksums): never over the old object

A snapshot names, per backup, the keys of its image and checksums with
their sizes and checksums (S3 ETags, engine/remote/digest.py): readers build a chain from the lineage and these
keys, never from the backing names inside the images (those name the local
files, which a rewrite does not rename). Everything loaded from a remote is
checked here before it is used (ids, device names, keys, numbers): a hostile
remote cannot make backupfs read or write outside the paths it expects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from engine.catalog import KINDS, BackupRecord, DeviceRecord
from engine.errors import BackupfsError
from engine.layout import BACKUP_ID_RE, DEVICES, file_rel, image_name, sums_name
from engine.remote.digest import Checksum, decode_checksum
from engine.validate import NAME_RE

FORMAT = 1
FORMAT_KEY = "backupfs-remote.json"
LOCK_DIR = "lock"
LOCK_KEY_RE = re.compile(r"lock/(\d{10})\.json")
MAX_LOCK_NUMBER = 9_999_999_999
# Where backupfs before the numbered lock kept it (rewritten in place); honoured while live.
LEGACY_LOCK_KEY = "lock.json"
CATALOG_DIR = "catalog"
CATALOG_KEY_RE = re.compile(r"catalog/(\d{10})\.json")
MAX_SNAPSHOT_NUMBER = 9_999_999_999  # the next would have eleven digits: a key no reader lists
# How many catalog snapshots a push keeps (the newest and a few before it).
KEEP_SNAPSHOTS = 3
MAX_CATALOG_BYTES = 256 << 20
_REVISION_RE = re.compile(r"\.r([1-9][0-9]{0,8})$")


class RemoteFormatError(BackupfsError):
    """A remote (or a copy of one) holds something backupfs did not write."""


def catalog_key(number: int) -> str:
    return f"{CATALOG_DIR}/{number:010d}.json"


def lock_key(number: int) -> str:
    return f"{LOCK_DIR}/{number:010d}.json"


def object_keys(device: str, ident: str, revision: int) -> tuple[str, str]:
    """(image key, checksums key) of a backup's ``revision``-th push (0: the first)."""
    stem = ident if revision == 0 else f"{ident}.r{revision}"
    return file_rel(device, image_name(stem)), file_rel(device, sums_name(stem))


def revision_of(device: str, ident: str, key: str) -> int | None:
    """The revision ``key`` is of backup ``ident``'s image or checksums, or None if it is neither."""
    prefix = file_rel(device, ident)
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    for ext in (".qcow2", ".sums"):
        if rest.endswith(ext):
            stem = rest[: -len(ext)]
            if stem == "":
                return 0
            m = _REVISION_RE.fullmatch(stem)
            return int(m.group(1)) if m else None
    return None


def object_owner(key: str) -> tuple[str, str] | None:
    """(device, backup id) when ``key`` has the form of a backup's object,
    ``devices/<dev>/<id>[.r<N>].qcow2`` or ``.sums``; else None. Only keys of
    this form under devices/ are ever deleted by a push (a user's file beside
    them, ``devices/notes.txt``, is left alone)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != DEVICES or not NAME_RE.fullmatch(parts[1]):
        return None
    for ext in (".qcow2", ".sums"):
        if parts[2].endswith(ext):
            stem = parts[2][: -len(ext)]
            m = _REVISION_RE.search(stem)
            ident = stem[: m.start()] if m else stem
            if BACKUP_ID_RE.fullmatch(ident) and revision_of(parts[1], ident, key) is not None:
                return parts[1], ident
    return None


@dataclass(frozen=True)
class RemoteObject:
    """An object a snapshot names: its key, size and checksum (engine/remote/digest.py)."""

    key: str
    size: int
    checksum: Checksum

    def data(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, **self.checksum.fields()}


@dataclass(frozen=True)
class RemoteBackup:
    """One backup as a remote's catalog records it."""

    record: BackupRecord  # its image and checksums fields hold the object keys
    image: RemoteObject
    checksums: RemoteObject | None

    def data(self) -> dict[str, Any]:
        r = self.record
        return {"id": r.id, "device": r.device, "seq": r.seq, "kind": r.kind, "parent": r.parent,
                "created_ns": r.created_ns, "size": r.size, "cluster_size": r.cluster_size,
                "granularity": r.granularity, "stored_bytes": r.stored_bytes, "label": r.label,
                "scanned": r.scanned, "image": self.image.data(),
                "checksums": self.checksums.data() if self.checksums else None}


@dataclass
class Snapshot:
    """A catalog snapshot: the devices and backups the remote holds."""

    number: int
    devices: list[DeviceRecord]
    backups: list[RemoteBackup]
    written_ns: int = 0

    def content(self) -> dict[str, Any]:
        """What the snapshot says, without its number and time: equal content, no new snapshot."""
        return {
            "devices": [{"name": d.name, "size": d.size, "granularity": d.granularity, "compress": d.compress,
                         "created_ns": d.created_ns} for d in self.devices],
            "backups": [b.data() for b in self.backups],
        }

    def encode(self) -> bytes:
        doc = {"format": FORMAT, "number": self.number, "written_ns": self.written_ns, **self.content(),
               "complete": True}
        return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()

    def keys(self) -> set[str]:
        """Every object key it names."""
        out = set()
        for b in self.backups:
            out.add(b.image.key)
            if b.checksums:
                out.add(b.checksums.key)
        return out


def _int(doc: dict[str, Any], name: str, where: str, low: int = 0, high: int = 1 << 62) -> int:
    v = doc.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise RemoteFormatError(f"{where}: {name} {v!r} is not a number from {low} to {high}")
    return v


def _object(doc: Any, device: str, ident: str, ext: str, where: str) -> RemoteObject:
    if not isinstance(doc, dict):
        raise RemoteFormatError(f"{where}: not an object entry")
    key = doc.get("key")
    if not isinstance(key, str) or not key.endswith(ext) or revision_of(device, ident, key) is None:
        raise RemoteFormatError(f"{where}: key {key!r} is not one of backup {ident}'s {ext} objects")
    size = _int(doc, "size", where)
    try:
        checksum = decode_checksum(doc, size)
    except ValueError as e:
        raise RemoteFormatError(f"{where}: {e}") from None
    return RemoteObject(key, size, checksum)


def decode_snapshot(data: bytes, where: str) -> Snapshot:
    """A snapshot's bytes, every field checked; ``where`` names it in errors."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RemoteFormatError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("complete") is not True:
        raise RemoteFormatError(f"{where}: not a complete catalog snapshot")
    if doc.get("format") != FORMAT:
        raise RemoteFormatError(f"{where}: catalog format {doc.get('format')!r} is not one this backupfs "
                                f"reads ({FORMAT}); upgrade backupfs")
    number = _int(doc, "number", where, 1, MAX_SNAPSHOT_NUMBER)
    devices: list[DeviceRecord] = []
    names: set[str] = set()
    devices_doc = doc.get("devices")
    for d in devices_doc if isinstance(devices_doc, list) else []:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not NAME_RE.fullmatch(d["name"]):
            raise RemoteFormatError(f"{where}: a device's name {d.get('name') if isinstance(d, dict) else d!r} "
                                    "breaks the device-name rule")
        w = f"{where}: device {d['name']}"
        if d["name"] in names:
            raise RemoteFormatError(f"{w}: listed twice")
        compress = d.get("compress", "none")
        if compress not in ("none", "zstd"):
            raise RemoteFormatError(f"{w}: compress {compress!r} is not none or zstd")
        devices.append(DeviceRecord(d["name"], "", _int(d, "size", w, 1), _int(d, "granularity", w, 512, 1 << 26),
                                    _int(d, "created_ns", w) if "created_ns" in d else 0, None, compress))
        names.add(d["name"])
    backups: list[RemoteBackup] = []
    ids: dict[str, RemoteBackup] = {}
    backups_doc = doc.get("backups")
    for b in backups_doc if isinstance(backups_doc, list) else []:
        if not isinstance(b, dict) or not isinstance(b.get("id"), str) or not BACKUP_ID_RE.fullmatch(b["id"]):
            raise RemoteFormatError(f"{where}: a backup's id is not a backup id")
        w = f"{where}: backup {b['id']}"
        dev = b.get("device")
        if dev not in names:
            raise RemoteFormatError(f"{w}: its device {dev!r} is not one of the snapshot's devices")
        parent = b.get("parent")
        if parent is not None and parent not in ids:
            raise RemoteFormatError(f"{w}: its parent {parent!r} is not a backup listed before it")
        if parent is not None and ids[parent].record.device != dev:
            raise RemoteFormatError(f"{w}: its parent {parent} is another device's")
        if b.get("kind") not in KINDS:
            raise RemoteFormatError(f"{w}: kind {b.get('kind')!r} is not one of {', '.join(KINDS)}")
        label = b.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 1000):
            raise RemoteFormatError(f"{w}: the label is not text")
        if b["id"] in ids:
            raise RemoteFormatError(f"{w}: listed twice")
        image = _object(b.get("image"), dev, b["id"], ".qcow2", f"{w} image")
        sums = None if b.get("checksums") is None else _object(b["checksums"], dev, b["id"], ".sums",
                                                                  f"{w} checksums")
        rec = BackupRecord(b["id"], dev, _int(b, "seq", w), b["kind"], parent, _int(b, "created_ns", w),
                           _int(b, "size", w, 1), _int(b, "cluster_size", w, 512, 1 << 21),
                           _int(b, "granularity", w, 512, 1 << 26), image.key, sums.key if sums else None,
                           _int(b, "stored_bytes", w), label, bool(b.get("scanned", False)))
        rb = RemoteBackup(rec, image, sums)
        ids[rec.id] = rb
        backups.append(rb)
    return Snapshot(number, devices, backups, _int(doc, "written_ns", where) if "written_ns" in doc else 0)
