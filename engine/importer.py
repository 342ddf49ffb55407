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
import time
from collections.abc import Callable, Sequence

from engine import durable
from engine.access import make_dir
from engine.catalog import BackupRecord, Catalog, CatalogError
from engine.chain import ChainView
from engine.errors import UsageError
from engine.fsutil import file_size, fsync_dir
from engine.job import copy_cluster_size, units_of, units_of_extents
from engine.limits import check_granules
from engine.prune import held_extents, rewrite_image
from engine.qcow2.backing import Confinement, open_chain
from engine.qcow2.layers import COMPRESSED, DATA, Qcow2Layer
from engine.sourceid import PathRefused, SourceId, open_disk
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
    allow_outside: Sequence[str] = (),
    backing_format: str | None = None,
    tip_format: str | None = None,
) -> list[BackupRecord]:
    """Import ``tip`` and its backing chain as backups of a new device ``name``.

    ``tip_format``: the tip's format as the user knows it; None tells it from
    the tip's first bytes (which, in a raw disk, its guest wrote: a qcow2
    header there would name a backing file for us to read).

    Backing files are read only inside the tip's directory tree and
    ``allow_outside``, never probed: ``backing_format`` is the format of a
    link that records none (see Confinement).
    """
    confine = Confinement.around(tip, allow_outside, backing_format)
    try:
        return _import_confined(repo_path, catalog, name, tip, granularity, source, on_layer, confine, tip_format)
    finally:
        confine.close()


def _import_confined(
    repo_path: str,
    catalog: Catalog,
    name: str,
    tip: str,
    granularity: int,
    source: str | None,
    on_layer: Callable[[int, int, str], None] | None,
    confine: Confinement,
    tip_format: str | None = None,
) -> list[BackupRecord]:
    """``import_chain`` with the backing files' directories held open (``confine``)."""
    if tip_format is not None and tip_format not in ("raw", "qcow2"):
        raise UsageError(f"--format must be raw or qcow2, not {tip_format!r}")
    layers = open_chain(tip, confine=confine, tip_format=tip_format)
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
    check_granules(size, granularity, f"{tip}: the disk")
    identity: SourceId | None = None
    if source is not None:
        source = utf8_path(os.path.abspath(source), "source")
        if os.path.commonpath([source, repo_path]) == repo_path:
            raise UsageError(f"source {source} lies inside the repository {repo_path}")
        try:
            # Checked before it is opened (a FIFO would block the open, and a
            # stranger's symlink lead elsewhere): see engine/sourceid.py.
            fd, identity = open_disk(source, os.O_RDONLY)
        except PathRefused as e:
            raise UsageError(f"source {source} is not a regular file or block device: it is {e.found}") from None
        except OSError as e:
            raise UsageError(f"source {source}: {e.strerror}") from None
        try:
            src_size = file_size(fd)
        finally:
            os.close(fd)
        if src_size != size:
            raise UsageError(f"source {source} is {src_size} bytes but the chain's disk is {size}")
    # The images are written first, each complete and durable; the device
    # and all its backups then appear in one catalog commit. Every file (and
    # the device's directory, if the import makes it) is recorded as an
    # intent before it is made: killed before the commit, the import left
    # only recorded files the catalog does not name, which the next open
    # removes: all of the import or none.
    ddir = os.path.join(repo_path, "devices", name)
    intents: list[str] = []
    if not os.path.lexists(ddir):
        intents.append(f"devices/{name}")
        catalog.record_intents("dir", intents)
    make_dir(ddir)
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
        with ChainView.open(path, confine=confine, tip_format=fmt) as content:
            own = content.layers[0]
            ranges = held_extents(own)
            if prev is None:  # a full needs only what is not zero
                ranges = ranges[(ranges[:, 2] == DATA) | (ranges[:, 2] == COMPRESSED)]
            held = units_of_extents(ranges, unit, size)
            if prev is not None and content.size < size:
                # Past an image's end QEMU reads zeros, never its backing
                # file: an image shorter than the tip hides the longer ones
                # below it there. Ours are all the tip's size, so say it
                # with zero clusters (the cluster its end falls in copied
                # whole, with the zeros after the end).
                held |= units_of([(content.size, size)], unit, size)
            tmp = os.path.join(ddir, f".tmp-{backup_id}.qcow2")
            files = [f"devices/{name}/{f}" for f in (os.path.basename(tmp), f"{backup_id}.qcow2", f"{backup_id}.sums")]
            catalog.record_intents("file", files)
            intents += files
            writer, record = rewrite_image(
                content, held, tmp, size, cs, granularity,
                f"{prev.id}.qcow2" if prev else None,
            )
        try:
            writer.commit()
            record.save(os.path.join(ddir, f"{backup_id}.sums"), atomic=False)  # a new file, recorded
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
    catalog.add_device(name, source or "", size, granularity, backups=records, identity=identity)
    try:
        catalog.clear_intents(intents)
    except CatalogError:
        pass  # the next open finds them committed and clears them
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
