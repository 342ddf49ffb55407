"""A power-loss simulator for the repository's durable writes.

``Recorder`` is installed as the engine's durable-write layer
(engine/durable.py) while an operation runs, and logs every write, fsync,
rename, unlink, directory fsync and catalog commit under the repository.
``materialize`` then rebuilds the repository as a power loss after the
first k logged operations would leave it on a strict POSIX filesystem:

- file contents are what the last fsync of that file made durable;
- a created, renamed or unlinked name is durable only after an fsync of its
  directory (before that the directory shows its last durable state);
- the catalog is as its last commit left it (SQLite, synchronous=FULL).

That is the worst case the ordering data -> tables -> header -> catalog
must survive; ext4's real behaviour loses less.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass, field

from engine.durable import FileSystem

CATALOG_FILES = ("catalog.db", "catalog.db-wal", "catalog.db-shm")
BARRIERS = ("fsync", "fsync_dir", "rename", "unlink", "catalog")


class Recorder(FileSystem):
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.ops: list[tuple] = []
        self._fds: dict[int, str] = {}

    def _mine(self, path: str) -> str | None:
        p = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
        if not p.startswith(self.root + os.sep):
            return None
        return os.path.relpath(p, self.root)

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        existed = os.path.exists(path)
        fd = os.open(path, flags, mode)
        rel = self._mine(path)
        if rel is not None:
            self._fds[fd] = rel
            if not existed:
                self.ops.append(("create", rel))
            elif flags & os.O_TRUNC:
                self.ops.append(("truncate", rel))
        return fd

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        os.close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        n = os.pwrite(fd, data, offset)
        if fd in self._fds:
            self.ops.append(("write", self._fds[fd], offset, bytes(memoryview(data)[:n])))
        return n

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        n = os.write(fd, data)
        if fd in self._fds:
            self.ops.append(("write", self._fds[fd], offset, bytes(memoryview(data)[:n])))
        return n

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        if fd in self._fds:
            self.ops.append(("fsync", self._fds[fd]))

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        a, b = self._mine(src), self._mine(dst)
        if a is not None and b is not None:
            self.ops.append(("rename", a, b))

    def unlink(self, path: str) -> None:
        os.unlink(path)
        rel = self._mine(path)
        if rel is not None:
            self.ops.append(("unlink", rel))

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        p = os.path.realpath(path)
        if p == self.root or p.startswith(self.root + os.sep):
            self.ops.append(("fsync_dir", os.path.relpath(p, self.root)))

    def catalog_committed(self, db_path: str) -> None:
        if self._mine(db_path) is None:
            return
        conn = sqlite3.connect(db_path)
        try:
            self.ops.append(("catalog", conn.serialize()))
        finally:
            conn.close()

    def crash_points(self, limit: int | None = None) -> list[int]:
        """Prefix lengths worth testing: around every barrier, and the ends.

        With ``limit``, an even sample of them (always keeping the ends).
        """
        points = {0, len(self.ops)}
        for i, op in enumerate(self.ops):
            if op[0] in BARRIERS:
                points.update((i, i + 1))
        ordered = sorted(points)
        if limit is None or len(ordered) <= limit:
            return ordered
        step = (len(ordered) - 1) / (limit - 1)
        return sorted({ordered[round(i * step)] for i in range(limit)})


@dataclass
class _Inode:
    data: bytearray
    durable: bytes


@dataclass
class _State:
    volatile: dict[str, _Inode] = field(default_factory=dict)
    durable: dict[str, _Inode] = field(default_factory=dict)
    catalog: bytes = b""


def snapshot(repo: str, dest: str) -> None:
    """A consistent copy of a repository before the operation (its starting state)."""
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(*CATALOG_FILES))
    conn = sqlite3.connect(os.path.join(repo, "catalog.db"))
    try:
        data = conn.serialize()
    finally:
        conn.close()
    with open(os.path.join(dest, "catalog.db"), "wb") as f:
        f.write(data)


def materialize(start: str, ops: list[tuple], out: str) -> None:
    """The repository ``start`` after ``ops`` and then a power loss."""
    state = _State()
    for dirpath, _dirs, files in os.walk(start):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, start)
            if rel in CATALOG_FILES:
                continue
            with open(full, "rb") as f:
                data = f.read()
            ino = _Inode(bytearray(data), data)
            state.volatile[rel] = state.durable[rel] = ino
    with open(os.path.join(start, "catalog.db"), "rb") as f:
        state.catalog = f.read()
    for op in ops:
        kind = op[0]
        if kind == "create":
            state.volatile[op[1]] = _Inode(bytearray(), b"")
        elif kind == "truncate":
            state.volatile[op[1]].data = bytearray()
        elif kind == "write":
            ino = state.volatile[op[1]]
            offset, data = op[2], op[3]
            if len(ino.data) < offset:
                ino.data += bytes(offset - len(ino.data))
            ino.data[offset : offset + len(data)] = data
        elif kind == "fsync":
            ino = state.volatile[op[1]]
            ino.durable = bytes(ino.data)
        elif kind == "rename":
            state.volatile[op[2]] = state.volatile.pop(op[1])
        elif kind == "unlink":
            state.volatile.pop(op[1], None)
        elif kind == "fsync_dir":
            d = "" if op[1] == "." else op[1]
            for path in [p for p in state.durable if os.path.dirname(p) == d]:
                del state.durable[path]
            for path, ino in state.volatile.items():
                if os.path.dirname(path) == d:
                    state.durable[path] = ino
        elif kind == "catalog":
            state.catalog = op[1]
    os.makedirs(out)
    dirs = {os.path.relpath(dirpath, start) for dirpath, _d, _f in os.walk(start)}
    for d in dirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for path, ino in state.durable.items():
        os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(out, path), "wb") as f:
            f.write(ino.durable)
    with open(os.path.join(out, "catalog.db"), "wb") as f:
        f.write(state.catalog)
