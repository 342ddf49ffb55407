"""`backupfs status --json`: one document, the same fields mounted or not.

Mounted, the live parts (bitmaps, the running job) come from the mount's
xattrs (``user.backupfs.bitmap``, ``user.backupfs.status``), never from
its texts, which are for people; the history comes from the catalog, read
beside the mount. Unmounted, the bitmaps come from the repository itself.
A device whose state cannot be read gets its reason in ``error`` and the
command exits 1, as the text status does. The schema is README's "Output
for scripts".
"""

from __future__ import annotations

import errno
import os
from typing import Any

from backupfs.cli_common import catalog_for_reading
from backupfs.cli_output import device_data, job_data, utc_iso
from backupfs.mountinfo import MountRecord, dead_mount, read_mount_record, refuse_dead_mount
from backupfs.mountstatus import StatusFields, read_bitmap, read_status
from engine.catalog import Catalog
from engine.errors import BackupfsError

RECENT_JOBS = 3  # as many as the text status shows


def live_job(fields: StatusFields) -> dict[str, Any]:
    """The mount's job status of one device, times as ISO 8601 UTC (and ns)."""
    out: dict[str, Any] = {k: v for k, v in fields.items() if k not in ("lines", "lines_left_out")}
    for key in ("started", "finished"):
        secs = fields[key]  # type: ignore[literal-required]
        out[key] = utc_iso(float(secs)) if secs is not None else None
        out[f"{key}_ns"] = int(secs * 1e9) if secs is not None else None
    return out


def _history(catalog: Catalog, name: str) -> dict[str, Any]:
    latest = catalog.latest_backup(name)
    return {"latest_backup": latest.id if latest else None,
            "recent_jobs": [job_data(j) for j in catalog.jobs(name, limit=RECENT_JOBS)]}


def _mounted(repo: str, record: MountRecord) -> tuple[dict[str, Any], bool]:
    refuse_dead_mount(repo, record, "status again")
    failed = False
    devices = []
    with catalog_for_reading(repo) as catalog:
        for d in catalog.devices():
            base = os.path.join(record.mountpoint, d.name)
            entry: dict[str, Any] = {**device_data(d), "bitmap": None, "job": None, "error": None}
            try:
                if d.source:  # an imported archive has no bitmap
                    entry["bitmap"] = dict(read_bitmap(os.path.join(base, "bitmap")))
                entry["job"] = live_job(read_status(os.path.join(base, "snapshot")))
            except (OSError, BackupfsError) as e:  # one device's trouble: say it, go on
                entry["error"] = e.strerror if isinstance(e, OSError) else str(e)
                failed = True
            devices.append({**entry, **_history(catalog, d.name)})
    return {"repository": os.path.abspath(repo), "mounted": True, "mountpoint": record.mountpoint,
            "daemon_pid": record.pid, "dead_mount": None, "held_by": None, "devices": devices}, failed


def status_document(repo: str) -> tuple[dict[str, Any], bool]:
    """The status as data, and whether anything in it failed (exit 1)."""
    from engine.repo import Repository

    from backupfs.status import bitmap_fields

    record = read_mount_record(os.path.abspath(repo))
    if record is not None:
        return _mounted(repo, record)
    doc: dict[str, Any] = {"repository": os.path.abspath(repo), "mounted": False, "mountpoint": None,
                           "daemon_pid": None, "dead_mount": None, "held_by": None, "devices": []}
    try:
        opened = Repository.open(repo, writable=False)  # status deletes nothing
    except BackupfsError as e:
        if getattr(e, "errno", None) != errno.EBUSY:
            raise
        # Another command holds it: what its catalog says (its bitmaps are that command's to tell).
        doc["held_by"] = str(e)
        with catalog_for_reading(repo) as catalog:
            doc["devices"] = [{**device_data(d), "bitmap": None, "job": None, "error": None,
                               **_history(catalog, d.name)} for d in catalog.devices()]
        return doc, False
    with opened:
        doc["dead_mount"] = dead_mount(os.path.abspath(repo))
        failed = doc["dead_mount"] is not None
        for d in opened.devices():
            entry: dict[str, Any] = {**device_data(d), "bitmap": None, "job": None, "error": None}
            if d.source:
                try:
                    entry["bitmap"] = dict(bitmap_fields(opened.device(d.name)))
                except BackupfsError as e:
                    entry["error"] = f"bitmap unavailable: {e}"
                    failed = True
            doc["devices"].append({**entry, **_history(opened.catalog, d.name)})
    return doc, failed
