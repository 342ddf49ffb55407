"""Adopting a chain QEMU or libvirt made as a device's history.

Each image of the chain, base first, is rewritten into a backup of ours:
the copy clusters it holds (widened to max(granularity, its cluster size))
are copied from the chain as it read at that image, so compressed
clusters, subclusters, version 2 images and raw bases all become plain
qcow2 v3 images with checksums, and every later operation (verify,
restore, prune, checksum-scan incrementals) works on them as on our own.
The originals are only read.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable

from engine import durable
from engine.catalog import BackupRecord, Catalog
from engine.chain import ChainView
from engine.errors import UsageError
from engine.fsutil import file_size, fsync_dir
from engine.job import copy_cluster_size, units_of
from engine.prune import held_ranges, rewrite_image
from engine.qcow2.backing import open_chain
from engine.qcow2.layers import COMPRESSED, DATA, Qcow2Layer
from engine.text import escape
from engine.validate import MAX_LABEL, utf8_path, validate_label

RAW_CLUSTER = 64 * 1024


def import_chain(
    repo_path: str,
    catalog: Catalog,
    name: str,
    tip: str,
    granularity: int,
    source: str | None,
    on_layer: Callable[[int, int, str], None] | None = None,
) -> list[BackupRecord]:
    """Import ``tip`` and its backing chain as backups of a new device ``name``."""
    layers = open_chain(tip)
    try:
        for layer in layers:
            if isinstance(layer, Qcow2Layer) and layer.header.corrupt:
                raise UsageError(
                    f"{layer.path}: QEMU marked this image corrupt; check it (backupfs image check) "
                    "and repair it with 'qemu-img check -r all' before importing"
                )
        size = layers[0].size
        info = [
            (layer.path, layer.format, layer.cluster_size or RAW_CLUSTER, os.fstat(layer.fd).st_mtime_ns)
            for layer in layers
        ]
    finally:
        for layer in layers:
            layer.close()
    if size <= 0 or size % 512:
        raise UsageError(f"{tip}: virtual size {size} is not a non-zero multiple of 512")
    if source is not None:
        source = utf8_path(os.path.abspath(source), "source")
        if os.path.commonpath([source, repo_path]) == repo_path:
            raise UsageError(f"source {source} lies inside the repository {repo_path}")
        try:
            # O_NONBLOCK: a FIFO would block the open (and the repository) forever.
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise UsageError(f"source {source}: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise UsageError(f"source {source} is not a regular file or block device")
            src_size = file_size(fd)
        finally:
            os.close(fd)
        if src_size != size:
            raise UsageError(f"source {source} is {src_size} bytes but the chain's disk is {size}")
    # The images are written first, each complete and durable; the device
    # and all its backups then appear in one catalog commit. Killed before
    # it, the import left only images the catalog does not know, which the
    # next open of the repository removes: all of the import or none.
    ddir = os.path.join(repo_path, "devices", name)
    os.makedirs(ddir, exist_ok=True)
    fsync_dir(os.path.dirname(ddir))  # the directory's own entry, before the catalog names it
    records: list[BackupRecord] = []
    prev: BackupRecord | None = None
    last_created = 0
    now = time.time_ns()
    for n, (path, fmt, cs, mtime_ns) in enumerate(reversed(info)):
        if on_layer is not None:
            on_layer(n, len(info), path)
        kind = "full" if prev is None else "incremental"
        seq = catalog.next_seq()
        # Ids sort by time, in chain order, and before any backup taken after
        # the import: a file dated in the future (a skewed clock) is not.
        created = max(min(mtime_ns, now), last_created + 1)
        last_created = created
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created / 1e9))
        backup_id = f"{stamp}-{seq:04d}-{kind}"
        unit = copy_cluster_size(granularity, cs)
        with ChainView.open(path) as content:
            own = content.layers[0]
            ranges = held_ranges(own)
            if prev is None:  # a full needs only what is not zero
                ranges = [(e.start, e.end) for e in own.allocation() if e.kind in (DATA, COMPRESSED)]
            elif content.size < size:
                # Past an image's end QEMU reads zeros, never its backing
                # file: an image shorter than the tip hides the longer ones
                # below it there. Ours are all the tip's size, so say it
                # with zero clusters (the cluster its end falls in copied
                # whole, with the zeros after the end).
                ranges.append((content.size, size))
            held = units_of([(a, min(b, size)) for a, b in ranges if a < size], unit, size)
            tmp = os.path.join(ddir, f".tmp-{backup_id}.qcow2")
            writer, record = rewrite_image(
                content, held, tmp, size, cs, granularity,
                f"{prev.id}.qcow2" if prev else None,
            )
        try:
            writer.commit()
            record.save(os.path.join(ddir, f"{backup_id}.sums"))
            durable.fs.replace(tmp, os.path.join(ddir, f"{backup_id}.qcow2"))
            fsync_dir(ddir)
        except BaseException:
            writer.abort()
            raise
        rec = BackupRecord(
            id=backup_id, device=name, seq=seq, kind=kind, parent=prev.id if prev else None,
            created_ns=created, size=size, cluster_size=cs, granularity=granularity,
            image=f"devices/{name}/{backup_id}.qcow2", checksums=f"devices/{name}/{backup_id}.sums",
            stored_bytes=writer.stored_bytes(), label=_import_label(path, fmt),
        )
        records.append(rec)
        prev = rec
    catalog.add_device(name, source or "", size, granularity, backups=records)
    return records


def _import_label(path: str, fmt: str) -> str:
    """The label of an imported backup: the file it came from, escaped.

    The name is the image maker's, not a user's: an ESC sequence or a
    newline in it must not reach a terminal or forge a row of `list`. Kept
    within the label rule (one printable line, MAX_LABEL characters), a long
    name shortened in the middle.
    """
    name = escape(os.path.basename(path))
    frame = f"imported from  ({escape(fmt)})"
    room = MAX_LABEL - len(frame)
    if len(name) > room:
        half = (room - 3) // 2
        name = name[:half] + "..." + name[len(name) - (room - 3 - half):]
    return validate_label(f"imported from {name} ({escape(fmt)})")
