"""Retention: choosing backups to drop, and removing one by merging it down.

Removing backup X from a chain rewrites each child C so that it no longer
needs X: C' holds everything C held, plus what X held where C held nothing,
widened to C's copy clusters (the aligned-copy rule) and read through C's
chain; C' backs onto X's parent (or onto nothing: then C becomes a full).
Every other point in time reads the same before and after.

Crash safety, step by step:

1. C' and its checksums are written under temporary names and fsynced.
   A crash here leaves temporaries that the next open removes: the old chain.
2. The removal is recorded as pending in the catalog.
3. C's checksums, then C's image, are replaced by rename. C' reads exactly
   like C did, and its checksums cover a superset of C's, so in every
   intermediate state each backup still reads right.
4. One catalog transaction re-points the children, drops X's row and the
   pending record.
5. X's files are deleted (a crash leaves orphans the next open removes).

A crash after step 2 is finished by the next open, which runs the removal
again (merging X into a child that already holds it changes nothing): the
new chain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from bitarray import bitarray

from engine import durable
from engine.catalog import BackupRecord
from engine.chain import ChainView
from engine.integrity import ChecksumMismatch
from engine.checksums import ChecksumRecord
from engine.errors import ImageError, UsageError
from engine.fsutil import fsync_dir
from engine.job import BackupJob, JobError, JobPlan, Progress, Source, copy_cluster_size, units_of_extents
from engine.layout import image_name, merge_names
from engine.publish import write_out
from engine.qcow2.format import COMPRESSION_ZSTD
from engine.qcow2.layers import UNALLOC, Layer, open_layer
from engine.qcow2.writer import Qcow2Writer
from engine.units import format_size


@dataclass
class RetentionPolicy:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None

    def empty(self) -> bool:
        return all(v is None for v in (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly))

    def validate(self) -> None:
        for name in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


def select_for_removal(backups: list[BackupRecord], policy: RetentionPolicy) -> list[BackupRecord]:
    """Backups the policy does not keep, oldest first. The newest is always kept.

    keep_daily/weekly/monthly keep the newest backup of each of the last N
    days/ISO weeks/months (local time) that have backups, as borg and
    restic do; the union of all rules is kept.
    """
    keep = keep_reasons(backups, policy)
    return [b for b in sorted(backups, key=lambda b: b.seq) if b.id not in keep]


def keep_reasons(backups: list[BackupRecord], policy: RetentionPolicy) -> dict[str, list[str]]:
    """The backups the policy keeps, each with the rules that keep it
    ("newest", "keep-last 3", "keep-daily 2026-12-05", ...): what a dry run
    shows, so that a rule that keeps too much or too little can be seen
    before anything is removed."""
    if policy.empty():
        raise UsageError("give a retention rule: --keep-last, --keep-daily, --keep-weekly or --keep-monthly")
    policy.validate()
    newest_first = sorted(backups, key=lambda b: b.seq, reverse=True)
    keep: dict[str, list[str]] = {}
    if newest_first:
        keep[newest_first[0].id] = ["newest"]
    if policy.keep_last:
        for b in newest_first[: policy.keep_last]:
            keep.setdefault(b.id, []).append(f"keep-last {policy.keep_last}")
    for rule, count, bucket in (
        ("keep-daily", policy.keep_daily, lambda t: time.strftime("%Y-%m-%d", t)),
        ("keep-weekly", policy.keep_weekly, lambda t: "%d-W%02d" % tuple(time_iso_week(t))),
        ("keep-monthly", policy.keep_monthly, lambda t: time.strftime("%Y-%m", t)),
    ):
        if not count:
            continue
        seen: list[str] = []
        for b in newest_first:
            key = bucket(time.localtime(b.created))
            if key in seen:
                continue
            seen.append(key)
            keep.setdefault(b.id, []).append(f"{rule} {key}")
            if len(seen) >= count:
                break
    return keep


def time_iso_week(t: time.struct_time) -> tuple[int, int]:
    import datetime

    year, week, _ = datetime.date(t.tm_year, t.tm_mon, t.tm_mday).isocalendar()
    return year, week


class ViewSource(Source):
    """A chain view as the source of a job: rewriting images from their content.

    Past the view's own end it reads zeros: an older image of a chain may
    be smaller than the disk it now belongs to.
    """

    def __init__(self, view: ChainView, size: int) -> None:
        super().__init__(-1, view.path, size)
        self.view = view

    def read(self, offset: int, length: int) -> bytearray:
        try:
            data = self.view.read(offset, length)
        except ImageError as e:
            raise JobError(f"reading {e}") from None
        except ChecksumMismatch as e:
            raise JobError(f"{e}; nothing was changed") from None
        if not isinstance(data, bytearray):
            data = bytearray(data)
        if len(data) < length:
            data += bytes(length - len(data))
        return data


def held_extents(layer: Layer) -> np.ndarray:
    """What one image itself holds (data, zeros or compressed), not its
    backing, as extent rows in order (see ``units_of_extents``)."""
    rows = layer.extents()
    return rows[rows[:, 2] != UNALLOC]


def _short(ident: str) -> str:
    """An id without its timestamp (``0042-incremental``), as a progress bar has room for."""
    return ident.partition("-")[2] or ident


def rewrite_image(
    content: ChainView,
    held: bitarray,
    target: str,
    size: int,
    cluster_size: int,
    granularity: int,
    backing: str | None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    compress: str | None = None,
) -> tuple[Qcow2Writer, ChecksumRecord]:
    """A new image holding the ``held`` copy clusters of ``content``; not yet committed."""
    writer = Qcow2Writer(target, size, cluster_size, backing_file=backing, backing_format="qcow2" if backing else None,
                         compress=compress)
    record = ChecksumRecord(size, granularity)
    plan = JobPlan(size, granularity, cluster_size, held, zeros_explicit=backing is not None)
    try:
        BackupJob(plan, ViewSource(content, size), writer, record, kind="rewrite", on_progress=on_progress).run()
    except BaseException:
        writer.abort()
        raise
    return writer, record


@dataclass
class PrunePreview:
    """What a prune would do (a dry run): every backup kept, with why, every
    removal, and the bytes it would free at most.

    The bound is the removed images' stored bytes: merging a removed backup
    into its children adds back what it holds that they do not (its
    clusters the children overwrote are what is really freed), so the true
    figure is lower when the removed backups have children.
    """

    keep: list[tuple[BackupRecord, list[str]]]
    remove: list[RemovalPlan]

    def freed_at_most(self) -> int:
        return sum(p.removed.stored_bytes for p in self.remove)

    def lines(self) -> list[str]:
        """One line a backup, oldest first, then the bytes: as the CLI and the trigger's status say it."""
        order = sorted([(b.seq, f"keep: {b.id} ({', '.join(why)})") for b, why in self.keep]
                       + [(p.removed.seq, f"would remove: {p.describe()}") for p in self.remove])
        freed = self.freed_at_most()
        if not self.remove:
            return [line for _seq, line in order] + ["would free: nothing (no backup would be removed)"]
        merged = sum(1 for p in self.remove if p.children)
        how = (f"; less what merging {merged} of them into their children adds back" if merged
               else ", none of them has a child to merge into: exact")
        return [line for _seq, line in order] + [
            f"would free: at most {freed} bytes ({format_size(freed)}): the stored bytes of the "
            f"{len(self.remove)} backup{'s' if len(self.remove) != 1 else ''} removed{how}"
        ]


@dataclass
class RemovalPlan:
    removed: BackupRecord
    children: list[BackupRecord] = field(default_factory=list)

    def describe(self) -> str:
        if not self.children:
            return self.removed.id
        into = ", ".join(c.id for c in self.children)
        return f"{self.removed.id}, merging what it holds into {into}"


def remove_backup(
    repo_path: str,
    x: BackupRecord,
    children: list[BackupRecord],
    begin: Callable[[], None],
    apply_catalog: Callable[[list[tuple[str, str | None, str, int]], list[str]], None],
    *,
    open_content: Callable[[BackupRecord], ChainView] | None = None,
    hook: Callable[[str], None] | None = None,
    intend: Callable[[list[str]], None] = lambda _paths: None,
    settled: Callable[[list[str]], None] = lambda _paths: None,
    on_progress: Callable[[Progress, str], None] | None = None,
) -> None:
    """Merge ``x`` into each child, then drop it. ``hook(step)`` is for tests.

    ``intend(paths)`` records files (relative to the repository) before
    they are made, so that recovery after a crash removes exactly them;
    ``settled(paths)`` forgets them once they are renamed or removed.
    ``apply_catalog(updates, leftovers)`` records x's files for deletion in
    the commit that drops x. ``on_progress(progress, what)`` sees each
    child's rewrite ("merging X into C").

    ``open_content(child)`` gives what the child reads now, checked against
    its checksums: a damaged cluster copied into the merged image would get
    fresh checksums there, and nothing could tell it from good data again.
    """
    step = hook or (lambda _name: None)
    ddir = os.path.join(repo_path, os.path.dirname(x.image))
    x_image = os.path.join(repo_path, x.image)
    new_parent = x.parent
    staged: list[tuple[BackupRecord, str, str, int]] = []
    try:
        for c in children:
            c_image = os.path.join(repo_path, c.image)
            tmp_image, tmp_sums = (os.path.join(ddir, f) for f in merge_names(c.id))
            unit = copy_cluster_size(c.granularity, c.cluster_size)
            intend([os.path.relpath(f, repo_path) for f in (tmp_image, tmp_sums)])
            with open_layer(c_image, "qcow2") as c_layer, open_layer(x_image, "qcow2") as x_layer:
                held = (units_of_extents(held_extents(c_layer), unit, c.size)
                        | units_of_extents(held_extents(x_layer), unit, c.size))
                # A merge of compressed backups stays compressed.
                zstd = COMPRESSION_ZSTD in (c_layer.header.compression_type, x_layer.header.compression_type)
            shown = None
            if on_progress is not None:
                report, what = on_progress, f"merging {_short(x.id)} into {_short(c.id)}"
                shown = lambda p: report(p, what)  # noqa: E731
            with (open_content(c) if open_content else ChainView.open(c_image, tip_format="qcow2")) as content:
                writer, record = rewrite_image(
                    content, held, tmp_image, c.size, c.cluster_size, c.granularity,
                    image_name(new_parent) if new_parent else None, on_progress=shown,
                    compress="zstd" if zstd else None,
                )
            write_out(writer, record, tmp_sums)  # itself a temporary, recorded
            staged.append((c, tmp_image, tmp_sums, writer.stored_bytes()))
            step("staged")
        # Every merged image is durable. From here on the removal is
        # recorded as pending: an interrupted one is finished at the next open.
        begin()
        step("pending")
        for c, tmp_image, tmp_sums, _stored in staged:
            if c.checksums:
                durable.fs.replace(tmp_sums, os.path.join(repo_path, c.checksums))
            step("sums-replaced")
            durable.fs.replace(tmp_image, os.path.join(repo_path, c.image))
            step("image-replaced")
        fsync_dir(ddir)
    except BaseException:
        for _c, tmp_image, tmp_sums, _s in staged:
            for f in (tmp_image, tmp_sums):
                try:
                    durable.fs.unlink(f)
                except FileNotFoundError:
                    pass
        raise
    temporaries = [os.path.relpath(f, repo_path) for _c, i, t, _s in staged for f in (i, t)]
    updates = [
        (c.id, new_parent, c.kind if new_parent else "full", stored) for c, _i, _s, stored in staged
    ]
    leftovers = [f for f in (x.image, x.checksums) if f]
    apply_catalog(updates, leftovers)
    step("catalog")
    for f in leftovers:
        try:
            durable.fs.unlink(os.path.join(repo_path, f))
        except FileNotFoundError:
            pass
    fsync_dir(ddir)
    settled(temporaries + leftovers)
    step("deleted")
