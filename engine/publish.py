"""Making a new image durable and visible under its final name: one order for all.

A backup, an import and a prune all end an image the same way: the
image's data, tables and header (``Qcow2Writer.commit``, fsynced), then
its checksums, then (backup and import) the rename into place and one
fsync of the directory. The catalog commit that names the files comes
after, in the caller. Written once here, so the crash ordering cannot
drift between the three.
"""

from __future__ import annotations

from engine import durable
from engine.checksums import ChecksumRecord
from engine.fsutil import fsync_dir
from engine.layout import BackupFiles
from engine.qcow2.writer import Qcow2Writer


def write_out(writer: Qcow2Writer, sums: ChecksumRecord, sums_path: str) -> None:
    """The image complete and durable, then its checksums at ``sums_path``.

    Written in place (not renamed): the path is a new file recorded as an
    intent, so until the catalog names it a crash leaves an orphan that
    the next open removes.
    """
    writer.commit()
    sums.save(sums_path, atomic=False)


def publish(writer: Qcow2Writer, sums: ChecksumRecord, files: BackupFiles) -> None:
    """``write_out``, then the image renamed from its temporary name into
    place; one directory fsync covers both new names."""
    write_out(writer, sums, files.sums)
    durable.fs.replace(files.tmp, files.image)
    fsync_dir(files.dir)
