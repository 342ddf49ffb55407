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

from engine.access import make_dir
from engine.catalog import BackupRecord, Catalog, CatalogError
from engine.chain import ChainView
from engine.errors import ImageError, UsageError
from engine.fsutil import fsync_dir
from engine.job import Progress, copy_cluster_size, units_of, units_of_extents
from engine.layout import BackupFiles, backup_id, device_dir, device_rel, image_name
from engine.limits import check_granules
from engine.prune import held_extents, rewrite_image
from engine.publish import publish
from engine.qcow2.backing import Confinement, open_chain
from engine.qcow2.layers import COMPRESSED, DATA, Qcow2Layer
from engine.sourcecheck import probe_source
from engine.sourceid import SourceId
from engine.text import escape
from engine.validate import MAX_LABEL, validate_label

RAW_CLUSTER = 64 * 1024


LayerInfo = tuple[str, str, int, int]  # path, format, cluster size, mtime_ns


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
    tip_format: str = "qcow2",
    raw_source: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    forbidden_dev: int | None = None,
) -> list[BackupRecord]:
    """Import ``tip`` and its backing chain as backups of a new device ``name``.

    Each backup is dated by its image's modification time (so retention by
    day keeps what it would have kept of the originals); ``on_layer(n,
    total, path)`` says which image is being rewritten, ``on_progress`` how
    far its copy is.

    ``tip_format``: the tip's format as the user states it (qcow2 unless told
    raw), never told from its first bytes: in a raw disk its guest wrote
    them, and a qcow2 header there would name a backing file for us to read.

    Backing files are read only inside the tip's directory tree and
    ``allow_outside``, never probed: ``backing_format`` is the format of a
    link that records none (see Confinement). ``raw_source``: a ``source``
    holding an image format is taken as raw bytes (engine/imageformat.py).
    """
    confine = Confinement.around(tip, allow_outside, backing_format, forbidden_dev)
    try:
        return _import_confined(repo_path, catalog, name, tip, granularity, source, on_layer, confine,
                                tip_format, raw_source, on_progress)
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
    tip_format: str,
    raw_source: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> list[BackupRecord]:
    """``import_chain`` with the backing files' directories held open (``confine``)."""
    size, info = _read_chain(tip, confine, tip_format)
    check_granules(size, granularity, f"{tip}: the disk")
    identity: SourceId | None = None
    if source is not None:
        # The same check as a device's add (engine/sourcecheck.py).
        source, src_size, identity = probe_source(source, repo_path, raw_source)
        if src_size != size:
            raise UsageError(f"source {source} is {src_size} bytes but the chain's disk is {size}")
    # The images are written first, each complete and durable; the device
    # and all its backups then appear in one catalog commit. Every file (and
    # the device's directory, if the import makes it) is recorded as an
    # intent before it is made: killed before the commit, the import left
    # only recorded files the catalog does not name, which the next open
    # removes: all of the import or none.
    ddir = device_dir(repo_path, name)
    intents: list[str] = []
    if not os.path.lexists(ddir):
        intents.append(device_rel(name))
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
        # the import: a file dated in the future (a skewed clock) is not. An
        # image older than its backing file (copied, or touched) keeps the
        # chain's order: it is dated a nanosecond after its parent.
        created = max(min(mtime_ns, now), last_created + 1)
        last_created = created
        files = BackupFiles(repo_path, name, backup_id(created, seq, kind))
        catalog.record_intents("file", files.intents())
        intents += files.intents()
        stored_bytes = _rewrite_layer(files, path, fmt, cs, confine, size, granularity, prev, on_progress)
        rec = BackupRecord(
            id=files.ident, device=name, seq=seq, kind=kind, parent=prev.id if prev else None,
            created_ns=created, size=size, cluster_size=cs, granularity=granularity,
            image=files.image_rel, checksums=files.sums_rel,
            stored_bytes=stored_bytes, label=_import_label(path, fmt),
        )
        records.append(rec)
        prev = rec
    catalog.add_device(name, source or "", size, granularity, backups=records, identity=identity)
    try:
        catalog.clear_intents(intents)
    except CatalogError:
        pass  # the next open finds them committed and clears them
    return records


def _read_chain(tip: str, confine: Confinement, tip_format: str) -> tuple[int, list[LayerInfo]]:
    """The disk's size and each image of the chain (tip first), refused if
    QEMU marked one corrupt or the size is not one a device can have."""
    if tip_format not in ("raw", "qcow2"):
        raise UsageError(f"--format must be raw or qcow2, not {tip_format!r}")
    try:
        layers = open_chain(tip, confine=confine, tip_format=tip_format)
    except ImageError as e:
        if tip_format == "qcow2" and e.path == tip and e.problem.startswith("not a qcow2 image"):
            raise ImageError(tip, f"{e.problem}; import reads qcow2 chains (give --format raw to import "
                                  "a raw disk)") from None
        raise
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
    return size, info


def _rewrite_layer(files: BackupFiles, path: str, fmt: str, cs: int, confine: Confinement, size: int,
                   granularity: int, prev: BackupRecord | None,
                   on_progress: Callable[[Progress], None] | None = None) -> int:
    """Rewrite one image of the chain as backup ``files`` (backing onto
    ``prev``), published; its stored bytes. Its files are recorded intents."""
    unit = copy_cluster_size(granularity, cs)
    with ChainView.open(path, confine=confine, tip_format=fmt, reopened=True) as content:
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
        writer, record = rewrite_image(
            content, held, files.tmp, size, cs, granularity,
            image_name(prev.id) if prev else None, on_progress=on_progress,
        )
    try:
        publish(writer, record, files)
    except BaseException:
        writer.abort()
        raise
    return writer.stored_bytes()


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
