"""`restore` and `verify` of a remote (``s3://BUCKET/PREFIX``), read-only.

Restore downloads the backup's lineage into a private temporary directory
(each object checked against the catalog's checksum), opens it as one chain
built from the catalog, writes the disk out with the same code as a local
restore, and removes the directory. Verify reads every object back and
checks its size and checksum against the catalog: damage done in the bucket
(a rewritten or truncated object) is found and named.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.catalog import BackupRecord
from engine.errors import UsageError
from engine.job import Progress
from engine.layout import matching_ids
from engine.remote.fetch import DamagedObject, fetch_chain, lineage_bytes, verify_object
from engine.remote.remotecatalog import RemoteCatalog
from engine.remote.store import RemoteError, RemoteStore
from engine.restore import RestoreResult, check_target, restore_to


def resolve(catalog: RemoteCatalog, device: str, ident: str) -> BackupRecord:
    """A backup of ``device`` by id, 'latest' or a unique suffix, as for a local repository."""
    if catalog.device(device) is None:
        raise UsageError(f"{catalog.where}: no device named {device!r}")
    backups = catalog.backups(device)
    if ident == "latest":
        if not backups:
            raise UsageError(f"{catalog.where}: device {device} has no backup")
        return backups[-1]
    found = matching_ids(ident, [b.id for b in backups])
    if len(found) > 1:
        raise UsageError(f"{ident!r} names more than one backup of {device}: " + ", ".join(found))
    if not found:
        raise UsageError(f"{catalog.where}: device {device} has no backup {ident!r}")
    rec = catalog.backup(found[0])
    assert rec is not None
    return rec


def restore_remote(store: RemoteStore, catalog: RemoteCatalog, device: str, ident: str, target: str, *,
                   force: bool = False, on_progress: Callable[[Progress], None] | None = None) -> RestoreResult:
    """Write a remote backup out to ``target`` (a file, sparse, or a block device)."""
    rec = resolve(catalog, device, ident)
    kind = check_target(target, rec.size, force)
    progress = Progress(total=lineage_bytes(catalog, rec.id), phase="downloading")

    def fetched(n: int) -> None:
        progress.done += n
        if on_progress:
            on_progress(progress)

    work = tempfile.mkdtemp(prefix="backupfs-remote-")  # 0700
    try:
        with fetch_chain(store, catalog, rec.id, work, fetched) as view:
            result = restore_to(lambda pos, out: view.read(pos, len(out), into=out), rec.size, target,
                                kind=kind, on_progress=on_progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.backup = rec.id
    return result


@dataclass
class RemoteVerifyReport:
    """What verify found, in the shape of a local verify's report (README: Output for scripts)."""

    checked: list[str] = field(default_factory=list)  # backup ids
    objects: int = 0
    bytes_read: int = 0
    problems: list[tuple[str, str, bool]] = field(default_factory=list)  # (backup, problem, inherited)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad(self) -> list[str]:
        return sorted({b for b, _p, _i in self.problems})

    def advice(self) -> list[str]:
        if self.ok:
            return []
        return ["delete the damaged objects named above from the bucket, then push again from the "
                "repository: a backup whose objects are missing is sent again (if the repository is gone, "
                "restore the backups that verify)"]

    def data(self) -> dict[str, object]:
        return {"ok": self.ok, "checked": list(self.checked), "bad": self.bad,
                "problems": [{"backup": b, "problem": p, "offset": None, "harms_reads": True, "inherited": i}
                             for b, p, i in self.problems],
                "bytes_read": self.bytes_read, "advice": self.advice()}


def verify_remote(store: RemoteStore, catalog: RemoteCatalog, device: str | None = None,
                  ident: str | None = None, on_bytes: Callable[[int], None] | None = None) -> RemoteVerifyReport:
    """Read back every object of the chosen backups; each that is not what the catalog
    records is a problem of its backup (and of every backup above it)."""
    if device is not None and catalog.device(device) is None:
        raise UsageError(f"{catalog.where}: no device named {device!r}")
    if ident is not None:
        if device is None:
            raise UsageError("--backup needs the device's NAME")
        chosen = [resolve(catalog, device, ident)]
    else:
        chosen = catalog.backups(device)
    report = RemoteVerifyReport()

    def counted(n: int) -> None:
        report.bytes_read += n
        if on_bytes:
            on_bytes(n)

    damaged: dict[str, str] = {}  # every damaged backup met, chosen or below one
    checked_here: set[str] = set()

    def check(rec_id: str) -> None:
        if rec_id in checked_here:
            return
        checked_here.add(rec_id)
        entry = catalog.entry(rec_id)
        assert entry is not None
        for obj in [entry.image] + ([entry.checksums] if entry.checksums else []):
            report.objects += 1
            try:
                verify_object(store, obj, counted)
            except DamagedObject as e:
                damaged.setdefault(rec_id, str(e))
            except RemoteError as e:
                if "no such object" not in str(e):
                    raise
                damaged.setdefault(rec_id, str(e))

    for rec in chosen:
        report.checked.append(rec.id)
        for below in reversed(catalog.lineage(rec.id)):  # what it reads through, then itself
            check(below.record.id)
        if rec.id in damaged:
            report.problems.append((rec.id, damaged[rec.id], False))
        else:
            broken = next((b.record.id for b in catalog.lineage(rec.id)[1:] if b.record.id in damaged), None)
            if broken is not None:
                report.problems.append((rec.id, f"reads through {broken}, which is damaged", True))
    return report
