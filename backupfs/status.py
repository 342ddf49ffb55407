"""What `cat MOUNT/<dev>/snapshot|chain|bitmap` print: text renderings.

The filesystem keeps one ``JobStatus`` per device: the running job's
progress, or how the last one ended (with the full error message, since the
writer of the trigger only got an errno).
"""

from __future__ import annotations

import errno
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from backupfs.mountstatus import BitmapFields, StatusFields
from engine.catalog import BackupRecord
from engine.device import Device
from engine.job import Progress
from engine.repo import BackupResult
from engine.text import escape, one_line
from engine.units import format_size

_MAX_RUNS_SHOWN = 20


def utc_text(ns_or_s: float) -> str:
    secs = ns_or_s / 1e9 if ns_or_s > 1e12 else ns_or_s
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))


@dataclass
class JobStatus:
    """The live or last job of one device, as the snapshot file shows it."""

    state: str = "idle"  # idle | running | succeeded | failed | cancelled
    command: str = ""
    requester: str | None = None  # "pid N (name)": whom to kill to cancel
    started: float = field(default_factory=time.time)
    finished: float | None = None
    progress: Progress | None = None
    result: BackupResult | None = None
    error: str | None = None
    errno: int | None = None
    bitmap_kept: bool = True
    lines: list[str] = field(default_factory=list)  # results of verify and prune
    began: float | None = None  # time.monotonic() at the start of the last job
    ended: float | None = None  # and at its end
    refused: list[str] = field(default_factory=list)  # trigger writes that waited for it (EBUSY)
    writer: object | None = None  # the open trigger file whose write ran it
    report: dict[str, Any] | None = None  # a verify's report as data (VerifyReport.data)

    def begin(self, command: str, requester: str | None = None) -> None:
        self.began = time.monotonic()
        self.state = "running"
        self.command = command
        self.requester = requester
        self.started = time.time()
        self.finished = None
        self.progress = None
        self.result = None
        self.error = None
        self.errno = None
        self.lines = []
        self.refused = []
        self.report = None

    def succeed(self, result: BackupResult | None = None, lines: list[str] | None = None) -> None:
        self.state = "succeeded"
        self.finished = time.time()
        self.ended = time.monotonic()
        self.result = result
        self.lines = lines or []

    def fail(self, message: str, err: int, bitmap_kept: bool = True, lines: list[str] | None = None) -> None:
        self.state = "failed"
        self.finished = time.time()
        self.ended = time.monotonic()
        self.error = message
        self.errno = err
        self.bitmap_kept = bitmap_kept
        self.lines = lines or []

    def cancel(self, reason: str, bitmap_kept: bool = True) -> None:
        self.state = "cancelled"
        self.finished = time.time()
        self.ended = time.monotonic()
        self.error = reason
        self.errno = errno.EINTR
        self.bitmap_kept = bitmap_kept
        self.lines = []

    def progress_line(self) -> str:
        p = self.progress
        if p is None:
            return "starting"
        pct = 100.0 * p.fraction()
        eta = p.eta
        eta_s = f", ETA {eta:.0f} s" if eta is not None else ""
        return (
            f"{p.phase} {format_size(p.done)} of {format_size(p.total)} ({pct:.0f}%), "
            f"{format_size(int(p.rate))}/s{eta_s}"
        )

    def fields(self) -> StatusFields:
        """The same status as data, for the CLI (backupfs/mountstatus.py): what
        ``render`` says, unescaped, in fields that do not change with its wording."""
        idle = self.state == "idle"
        p = self.progress if self.state == "running" else None
        r = self.result if self.state == "succeeded" else None
        return {
            "state": self.state,
            "command": self.command,
            "requester": self.requester if self.state == "running" else None,
            "started": None if idle else self.started,
            "finished": self.finished,
            "progress": None if p is None else {
                "phase": p.phase, "done": p.done, "total": p.total, "rate": p.rate, "eta": p.eta,
                "text": self.progress_line(),
            },
            "result": None if r is None else {
                "backup": None if r.unchanged else r.record.id, "kind": None if r.unchanged else r.record.kind,
                "parent": r.record.id if r.unchanged else r.record.parent, "seconds": r.seconds,
                "bytes_examined": r.bytes_total, "bytes_stored": r.bytes_written, "cbw_clusters": r.cbw_units,
                "scanned": r.scanned, "scan_reason": r.scan_reason,
                "unchanged_since": r.record.id if r.unchanged else None,
            },
            "error": self.error if self.state in ("failed", "cancelled") else None,
            "errno": errno.errorcode.get(self.errno or errno.EIO, "EIO") if self.state in ("failed", "cancelled")
            else None,
            "bitmap_kept": self.bitmap_kept,
            "lines": list(self.lines),
            "lines_left_out": 0,
            "refused": self.refused[-5:],
            "report": self.report,
        }

    def render(self) -> str:
        if self.state == "idle":
            return "state: idle\nno backup has been triggered since the mount\n"
        lines = [f"state: {self.state}", f"command: {one_line(self.command)}", f"started: {utc_text(self.started)}"]
        if self.state == "running":
            p = self.progress
            if self.requester:
                lines.append(f"requested by: {one_line(self.requester)} (interrupt or kill it to cancel)")
            lines.append(f"progress: {self.progress_line()}")
            if p is not None:
                lines.append(f"bytes: {p.done} / {p.total}")
                lines.append(f"rate: {int(p.rate)} bytes/s")
                lines.append(f"eta: {p.eta:.1f} s" if p.eta is not None else "eta: unknown")
        elif self.state == "succeeded" and self.result is not None and self.result.unchanged:
            r = self.result
            lines += [
                f"finished: {utc_text(self.finished or time.time())}",
                f"unchanged: nothing changed since {escape(r.record.id)}; no backup was made",
                f"duration: {r.seconds:.2f} s",
                f"bytes examined: {r.bytes_total}",
                f"scanned: {'yes (' + one_line(r.scan_reason or '') + ')' if r.scanned else 'no'}",
            ]
        elif self.state == "succeeded" and self.result is not None:
            r = self.result
            lines += [
                f"finished: {utc_text(self.finished or time.time())}",
                f"backup: {escape(r.record.id)}",
                f"kind: {r.record.kind}",
                f"parent: {escape(r.record.parent or '-')}",
                f"duration: {r.seconds:.2f} s",
                f"bytes examined: {r.bytes_total}",
                f"bytes stored: {r.bytes_written}",
                f"copy-before-write clusters: {r.cbw_units}",
                f"scanned: {'yes (' + one_line(r.scan_reason or '') + ')' if r.scanned else 'no'}",
            ]
        elif self.state == "succeeded":
            lines.append(f"finished: {utc_text(self.finished or time.time())}")
        elif self.state == "failed":
            name = errno.errorcode.get(self.errno or errno.EIO, "EIO")
            lines += [
                f"finished: {utc_text(self.finished or time.time())}",
                f"error: {name}: {one_line(self.error or '')}",
            ]
            if self.bitmap_kept:
                lines.append("bitmap: kept; the next backup copies these regions again")
        elif self.state == "cancelled":
            lines += [
                f"finished: {utc_text(self.finished or time.time())}",
                f"cancelled: {one_line(self.error or '')}; no backup was made",
            ]
            if self.bitmap_kept:
                lines.append("bitmap: kept; the next backup copies these regions again")
        lines += [one_line(line) for line in self.lines]
        lines += [f"refused: {one_line(r)}" for r in self.refused[-5:]]
        return "\n".join(lines) + "\n"


def render_chain(backups: list[BackupRecord]) -> str:
    """One line a backup, oldest first, aligned for reading."""
    header = ("ID", "KIND", "PARENT", "CLUSTER", "STORED", "CREATED", "LABEL")
    rows = [
        (
            escape(b.id),
            escape(b.kind),
            escape(b.parent or "-"),
            format_size(b.cluster_size).replace(" ", ""),
            format_size(b.stored_bytes).replace(" ", ""),
            utc_text(b.created_ns),
            escape(b.label or ""),
        )
        for b in backups
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(out) + "\n"


def bitmap_fields(dev: Device) -> BitmapFields:
    """The bitmap state as data (status --json, mounted or not): what the
    next incremental and differential would copy, and whether the bits are
    trusted. Counts what is pending, so a running job's frozen bits count."""
    return {
        "trusted": dev.trusted,
        "untrusted_reason": None if dev.trusted else (dev.untrusted_reason or "unknown"),
        "granularity": dev.granularity,
        "dirty_since_last": dev.since_last.pending().dirty_bytes(),
        "dirty_since_full": dev.since_full.pending().dirty_bytes(),
    }


def render_bitmap(dev: Device) -> str:
    lines = [f"granularity: {dev.granularity}"]
    for label, tracked in (("since last backup", dev.since_last), ("since last full", dev.since_full)):
        bm = tracked.pending()
        state = "trusted" if tracked.trusted else f"untrusted ({one_line(dev.untrusted_reason or 'unknown')})"
        lines.append(
            f"{label}: {bm.dirty_bytes()} bytes dirty in {bm.run_count()} runs, {state}"
        )
    lines.append("runs since last backup (start length):")
    pending = dev.since_last.pending()
    for start, end in itertools.islice(pending.runs(), _MAX_RUNS_SHOWN):
        lines.append(f"  {start} {end - start}")
    more = pending.run_count() - _MAX_RUNS_SHOWN
    if more > 0:
        lines.append(f"  ... {more} more")
    return "\n".join(lines) + "\n"

