"""A device's job status as data: the ``user.backupfs.status`` xattr of MOUNT/<device>/snapshot.

The snapshot file's text is for people, and changes with them; the CLI
(backup, verify and prune through the mount, umount's list of running
jobs) reads this instead: one JSON object, taken in one getxattr, so its
fields all describe the same moment. The daemon fills it from the same
``JobStatus`` that renders the text (backupfs/status.py).

Values are raw (names, messages and lines as the daemon holds them, not
escaped): whoever prints one escapes it, as for any other text.

This module is the schema and the reader; it imports nothing heavy, so
that the CLI starts fast.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, TypedDict

from engine.errors import BackupfsError

STATUS_XATTR = "user.backupfs.status"
# The kernel's XATTR_SIZE_MAX: a longer value cannot be read at all. A
# verify report of thousands of backups can pass it; its lines are then
# left out (``lines_left_out`` says how many) and stay in the text.
XATTR_SIZE_MAX = 65536


class ProgressFields(TypedDict):
    phase: str
    done: int
    total: int
    rate: float  # bytes per second
    eta: float | None  # seconds, None while nothing is done yet
    text: str  # as the text's "progress:" line says it


class ResultFields(TypedDict):
    backup: str | None  # None: nothing changed, no backup was made (see unchanged_since)
    kind: str | None
    parent: str | None
    seconds: float
    bytes_examined: int
    bytes_stored: int
    cbw_clusters: int
    scanned: bool
    scan_reason: str | None
    unchanged_since: str | None  # nothing changed since this backup: no image was made


class StatusFields(TypedDict):
    state: str  # idle | running | succeeded | failed | cancelled
    command: str
    requester: str | None  # "pid N (name)", while running: whom to stop to cancel
    started: float | None  # seconds since the epoch; None when idle
    finished: float | None
    progress: ProgressFields | None  # while running
    result: ResultFields | None  # a backup that succeeded
    error: str | None  # why it failed, or why it was cancelled
    errno: str | None  # its errno's name, e.g. "EINVAL"
    bitmap_kept: bool
    lines: list[str]  # what verify ("report: ...") and prune ("removed: ...") found
    lines_left_out: int
    refused: list[str]  # trigger writes refused while it ran (EBUSY)
    # A verify's report as data (VerifyReport.data); None for other jobs, and
    # when it would not fit (then the text's "report: " lines hold it all).
    # Not required of a daemon: one older than this command has none.
    report: dict[str, Any] | None


_KEYS = frozenset(StatusFields.__annotations__) - {"report"}

BITMAP_XATTR = "user.backupfs.bitmap"


class BitmapFields(TypedDict):
    """A device's dirty bitmaps as `status --json` gives them, mounted or not:
    the ``user.backupfs.bitmap`` xattr of MOUNT/<device>/bitmap."""

    trusted: bool
    untrusted_reason: str | None
    granularity: int
    dirty_since_last: int  # bytes the next incremental copies (without a scan)
    dirty_since_full: int  # and the next differential


def _mount_xattr(path: str, name: str, what: str) -> bytes:
    """An xattr the mount's daemon sets; one it lacks means a daemon older than this command."""
    try:
        return os.getxattr(path, name)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
        raise BackupfsError(f"{path} gives no {what} ({name}): is the mount's daemon "
                            "older than this command? Unmount and mount again") from None


def read_bitmap(bitmap_file: str) -> BitmapFields:
    """The bitmap state the mount reports; BackupfsError with the mount's
    reason when it has none (e.g. the device's source is missing)."""
    value = _mount_xattr(bitmap_file, BITMAP_XATTR, "bitmap state")
    try:
        fields: Any = json.loads(value)
    except ValueError as e:
        raise BackupfsError(f"the mount's bitmap state is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise BackupfsError("the mount's bitmap state is not a JSON object")
    if "error" in fields:
        raise BackupfsError(str(fields["error"]))
    if not BitmapFields.__annotations__.keys() <= fields.keys():
        raise BackupfsError("the mount's bitmap state lacks fields it must have (trusted, ...)")
    return fields  # type: ignore[return-value]


def encode_status(fields: StatusFields) -> bytes:
    """The xattr's value; the job's lines left out if they would not fit."""
    value = json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()
    if len(value) > XATTR_SIZE_MAX:
        fields = {**fields, "lines": [], "lines_left_out": len(fields["lines"])}  # type: ignore[typeddict-item]
        value = json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()
    if len(value) > XATTR_SIZE_MAX:  # the report too: the text has it whole
        fields = {**fields, "report": None}
        value = json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()
    return value


def decode_status(value: bytes) -> StatusFields:
    """Parse the xattr; a value that is not a status object is an error, not an empty status."""
    try:
        fields: Any = json.loads(value)
    except ValueError as e:
        raise BackupfsError(f"the mount's job status is not JSON: {e}") from None
    if not isinstance(fields, dict) or not _KEYS <= fields.keys() or not isinstance(fields["state"], str):
        raise BackupfsError("the mount's job status lacks fields it must have (state, command, ...)")
    return fields  # type: ignore[return-value]


def read_status(snapshot: str) -> StatusFields:
    """The job status of the device whose snapshot file is ``snapshot``.

    OSError if the mount does not answer (gone, dead); BackupfsError if
    it answers without a status (a daemon older than this command).
    """
    value = _mount_xattr(snapshot, STATUS_XATTR, "job status")
    return decode_status(value)


def failure_message(fields: StatusFields) -> str | None:
    """Why the job failed, if it did (a cancelled job is told apart by the caller)."""
    return fields["error"] if fields["state"] == "failed" else None


def progress_text(fields: StatusFields, otherwise: str) -> str:
    """How far a running job is, as the text's "progress:" line says it;
    ``otherwise`` when no job runs."""
    if fields["progress"] is not None:
        return fields["progress"]["text"]
    return "starting" if fields["state"] == "running" else otherwise


def verify_report(snapshot: str, fields: StatusFields) -> dict[str, Any]:
    """The report of the verify that just ran, as data (VerifyReport.data):
    from the status, or read back from the text when it did not fit there."""
    from engine.integrity import VerifyReport

    report = fields.get("report")
    if report is not None:
        return report
    lines = [line[len("report: "):] for line in job_lines(snapshot, fields) if line.startswith("report: ")]
    return VerifyReport.from_rendered(lines).data()


def job_lines(snapshot: str, fields: StatusFields) -> list[str]:
    """The lines the last job found (verify's report, what prune removed).

    All of them: when the xattr had no room for them, they are read from
    the text (escaped there, one line each)."""
    if not fields["lines_left_out"]:
        return fields["lines"]
    with open(snapshot, "rb") as f:
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if line.startswith(("report: ", "removed: ", "would remove: "))]
