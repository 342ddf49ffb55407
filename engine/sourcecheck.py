"""The one check a disk passes before a device is bound to it (add, rebind, import).

A source must be a regular file or block device outside the repository,
reached without an untrusted symlink (engine/sourceid.py): backed up from
inside the repository, a device would copy backupfs's own files into its
backups, and a restore over it would overwrite them.
"""

from __future__ import annotations

import os

from engine.errors import UsageError
from engine.fsutil import file_size
from engine.imageformat import refuse_image_format
from engine.sourceid import PathRefused, SourceId, open_disk
from engine.validate import utf8_path


def probe_source(source: str, repo_path: str, raw: bool = False) -> tuple[str, int, SourceId]:
    """(absolute path, size, identity) of a source to bind a device to,
    refused unless it is a regular file or block device outside the
    repository, reached without an untrusted symlink (engine/sourceid.py).

    Checked before it is opened: a FIFO would block the open, and a
    stranger's symlink lead elsewhere. The caller checks the size. Unless
    ``raw``, a source whose first bytes name an image format (qcow2, VMDK,
    VHD, VHDX, VDI) is refused: its backups would hold the container, not
    the disk (engine/imageformat.py).
    """
    source = utf8_path(os.path.abspath(source), "source")
    if os.path.commonpath([source, repo_path]) == repo_path:
        raise UsageError(f"source {source} lies inside the repository {repo_path}")
    try:
        fd, identity = open_disk(source, os.O_RDONLY)
    except PathRefused as e:
        if e.link:
            raise UsageError(f"source {source} is {e.found}; give the path of the file or device "
                             "itself") from None
        raise UsageError(f"source {source} is not a regular file or block device: it is {e.found}") from None
    except OSError as e:
        raise UsageError(f"source {source}: {e.strerror}") from None
    try:
        size = file_size(fd)
        if not raw:
            try:
                refuse_image_format(fd, size, source)
            except OSError as e:
                raise UsageError(f"source {source}: cannot read its first bytes: {e.strerror}") from None
        real = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else source
    finally:
        os.close(fd)
    if os.path.commonpath([real, os.path.realpath(repo_path)]) == os.path.realpath(repo_path):
        raise UsageError(f"source {source} leads to {real}, inside the repository {repo_path}")
    return source, size, identity
