"""How commands print: JSON for scripts, columns for people, tabs for pipes.

Every `--json` goes through here, so that each one spells times, sizes and
absent values the same way (README "Output for scripts"): sizes in bytes,
times as ISO 8601 UTC (``2026-11-27T09:00:00Z``) with the exact
nanoseconds beside them (``created_ns``), absent values as null. JSON
carries text raw (escaped by the JSON encoder, not by `escape`): a script
gets the label it stored.

A table goes to a terminal with a header and aligned columns, sizes as
people read them (1.5G); to a pipe as tab-separated exact values, the way
it always did, so that `cut -f1` and `awk -F'\\t'` keep working.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from engine.catalog import BackupRecord, DeviceRecord, JobRecord
from engine.text import escape


def utc_iso(ns: int | float) -> str:
    """Nanoseconds (or seconds, a float) since the epoch as ISO 8601 UTC, to the second."""
    secs = ns / 1e9 if isinstance(ns, int) else ns
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))


def print_json(value: Any) -> None:
    """One JSON document on stdout: ASCII only, so that no byte of it is a terminal escape."""
    print(json.dumps(value, ensure_ascii=True))


def backup_data(b: BackupRecord) -> dict[str, Any]:
    """A backup as `list --json` gives it."""
    return {
        "id": b.id, "device": b.device, "kind": b.kind, "parent": b.parent,
        "created": utc_iso(b.created_ns), "created_ns": b.created_ns,
        "size": b.size, "cluster_size": b.cluster_size, "granularity": b.granularity,
        "stored_bytes": b.stored_bytes, "label": b.label, "image": b.image,
    }


def device_data(d: DeviceRecord) -> dict[str, Any]:
    """A device as `device list --json` gives it (source null: an imported archive)."""
    return {"name": d.name, "source": d.source or None, "size": d.size, "granularity": d.granularity,
            "compress": d.compress}


def job_data(j: JobRecord) -> dict[str, Any]:
    """A job the catalog recorded (status's recent jobs)."""
    return {
        "id": j.id, "kind": j.kind, "state": j.state,
        "started": utc_iso(j.started_ns), "started_ns": j.started_ns,
        "finished": utc_iso(j.finished_ns) if j.finished_ns else None, "finished_ns": j.finished_ns,
        "backup": j.backup, "error": j.error,
    }


def short_size(n: int) -> str:
    """A size as `ls -lh` and `df -h` show it: 0, 512, 64K, 1.5G, 12G."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1024 or unit == "P":
            if unit == "":
                return str(n)
            return f"{value:.1f}".removesuffix(".0") + unit if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def on_terminal() -> bool:
    """Is stdout a terminal (a person reading), not a pipe or a file (a script)?"""
    return sys.stdout.isatty()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, tty: bool,
                header_when_piped: bool) -> None:
    """Rows of already escaped fields: aligned under a header on a terminal,
    tab-separated in a pipe (with the header only if it always had one)."""
    if not tty:
        if header_when_piped:
            print("\t".join(header))
        for row in rows:
            print("\t".join(row))
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def backup_row(b: BackupRecord, tty: bool) -> list[str]:
    """One line of `list`: sizes for people on a terminal, exact bytes in a pipe."""
    size = short_size if tty else str
    return [escape(b.id), escape(b.device), escape(b.kind), escape(b.parent or "-"), utc_iso(b.created_ns),
            size(b.cluster_size), size(b.stored_bytes), escape(b.label or "")]


BACKUP_HEADER = ("ID", "DEVICE", "KIND", "PARENT", "CREATED", "CLUSTER", "STORED", "LABEL")
DEVICE_HEADER = ("NAME", "SOURCE", "SIZE", "GRANULARITY", "COMPRESS")


def device_row(d: DeviceRecord, tty: bool) -> list[str]:
    """One line of `device list`."""
    size = short_size if tty else str
    source = escape(d.source) if d.source else ("(imported, no source)" if tty else "")
    return [escape(d.name), source, size(d.size), size(d.granularity), d.compress]
