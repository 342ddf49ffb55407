"""`restore` and `verify` of a remote (``s3://BUCKET/PREFIX``), read-only.

Restore downloads the backup's lineage into a private temporary directory
(each object checked against the catalog's sha256), opens it as one chain
built from the catalog, writes the disk out with the same code as a local
restore, and removes the directory. Verify reads every object back and
checks its size and sha256 against the catalog: damage done in the bucket
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
from engine.remote.store import RemoteStore
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
    checked: int = 0  # backups
    objects: int = 0
    bytes_read: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (backup, problem)

    @property
    def ok(self) -> bool:
        return not self.problems

    def data(self) -> dict[str, object]:
        return {"ok": self.ok, "checked": self.checked, "bad": len({b for b, _p in self.problems}),
                "problems": [{"backup": b, "problem": p} for b, p in self.problems], "bytes_read": self.bytes_read}


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

    for rec in chosen:
        entry = catalog.entry(rec.id)
        assert entry is not None
        report.checked += 1
        for obj in [entry.image] + ([entry.checksums] if entry.checksums else []):
            report.objects += 1
            try:
                verify_object(store, obj, counted)
            except DamagedObject as e:
                report.problems.append((rec.id, str(e)))
            except Exception as e:  # noqa: BLE001 - a missing object is a problem of this backup too
                from engine.remote.store import RemoteError

                if not isinstance(e, RemoteError) or "no such object" not in str(e):
                    raise
                report.problems.append((rec.id, str(e)))
    return report
