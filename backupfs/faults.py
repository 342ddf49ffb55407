"""Fault injection for tests: the filesystem with chosen requests failing.

The tests of how one failing request is contained, and of backups whose
source fails to read, start the daemon with ``BACKUPFS_TEST_FAULTS`` set
(comma-separated):

- ``handler`` or ``handler:kind`` (``getxattr``, ``read:chain``): those
  requests fail as an unexpected exception would (logged, EIO);
- ``source-eio@N``: every backup's Nth source read fails with EIO.

The mount builds ``FaultyOperations`` only when that variable is set;
``BackupOperations`` itself has no fault code.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

from backupfs.fs import BackupOperations, handler
from backupfs.jobs import SourceFactory
from backupfs.mountaccess import MountAccess
from engine.job import FailingSource
from engine.repo import Repository

FAULTS_ENV = "BACKUPFS_TEST_FAULTS"
HANDLE_REQUESTS = ("read", "write", "release", "fsync", "flush")  # their first argument is a file handle


def parse_faults(text: str | None) -> set[str]:
    return {f.strip() for f in (text or "").split(",") if f.strip()}


def source_fault(faults: set[str]) -> SourceFactory | None:
    """"source-eio@N": a source that fails its Nth read with EIO."""
    for f in faults:
        if f.startswith("source-eio@"):
            n = int(f.split("@", 1)[1])
            return lambda dev: FailingSource(dev.fd, dev.path, dev.size, n)
    return None


class FaultyOperations(BackupOperations):
    """BackupOperations whose named handlers raise an injected exception
    (inside the handler's own error handling, so it is logged and answered
    as a real one would be)."""

    def __init__(self, repo: Repository, faults: set[str], mountpoint: str | None = None,
                 files_owner_only: bool = False, access: MountAccess | None = None) -> None:
        super().__init__(repo, mountpoint=mountpoint, source_factory=source_fault(faults),
                         files_owner_only=files_owner_only, access=access)
        self._faults = faults
        for name in {f.split(":")[0] for f in faults if "@" not in f}:
            setattr(self, name, types.MethodType(self._failing(name, getattr(self, name)), self))

    def _failing(self, name: str, serve: Callable[..., Any]) -> Callable[..., Any]:
        async def request(ops: FaultyOperations, *args: Any, **kwargs: Any) -> Any:
            ops._inject_fault(name, args)
            return await serve(*args, **kwargs)

        request.__name__ = name
        return handler(request)

    def _inject_fault(self, name: str, args: tuple) -> None:
        kind = None
        if args and isinstance(args[0], int):
            handle = self._handles.get(args[0]) if name in HANDLE_REQUESTS else None
            node = handle.node if handle else self.inodes.find(args[0])
            kind = node.kind if node else None
        if name in self._faults or f"{name}:{kind}" in self._faults:
            raise RuntimeError(f"injected fault in {name}")


def operations(repo: Repository, mountpoint: str, files_owner_only: bool = False,
               access: MountAccess | None = None) -> BackupOperations:
    """The filesystem a mount serves: with the faults a test asked for, if any."""
    faults = parse_faults(os.environ.get(FAULTS_ENV))
    if faults:
        return FaultyOperations(repo, faults, mountpoint=mountpoint, files_owner_only=files_owner_only,
                                access=access)
    return BackupOperations(repo, mountpoint=mountpoint, files_owner_only=files_owner_only, access=access)
