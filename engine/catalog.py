"""The repository's catalog: devices, backups and their lineage, job history.

SQLite in WAL mode with synchronous=FULL: a backup exists for users exactly
when its row is committed, and that commit is the last step of a job (after
the image and its checksums are durable). One connection, shared by the
threads of one process behind a lock; the repository lock keeps other
processes out.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from engine import durable
from engine.access import set_new_file_mode
from engine.ceph import CephError, from_record, is_rbd
from engine.errors import ErrnoError, UsageError
from engine.layout import BACKUP_ID_RE, device_rel
from engine.remote.location import RemoteSpec, validate_endpoint, validate_remote_name
from engine.sourceid import SourceId
from engine.validate import NAME_RE

SCHEMA_VERSION = 1
KINDS = ("full", "incremental", "differential")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    granularity INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL REFERENCES devices(name),
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('full', 'incremental', 'differential')),
    parent TEXT REFERENCES backups(id),
    created_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    cluster_size INTEGER NOT NULL,
    granularity INTEGER NOT NULL,
    image TEXT NOT NULL,
    checksums TEXT,
    stored_bytes INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'complete',
    label TEXT,
    scanned INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device, seq)
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    started_ns INTEGER NOT NULL,
    finished_ns INTEGER,
    state TEXT NOT NULL,
    backup TEXT,
    bytes_total INTEGER,
    bytes_done INTEGER,
    bytes_written INTEGER,
    scanned INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE pending_removals (
    backup TEXT PRIMARY KEY REFERENCES backups(id)
);
CREATE INDEX backups_by_device ON backups (device, seq);
CREATE INDEX jobs_by_device ON jobs (device, id);
"""

# Files a job, an import or a prune is about to create (or, for a removal,
# to delete), recorded before it does: recovery removes what these name and
# nothing else, so a file backupfs did not make is never deleted.
_INTENTS = """
CREATE TABLE IF NOT EXISTS intents (
    path TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    created_ns INTEGER NOT NULL
)
"""

# What `verify` last found of each backup: 'bad' (with the first problem)
# or 'good'. Not a foreign key: a prune removes a backup's row first, and a
# verdict of a backup that is gone is never asked for.
_VERDICTS = """
CREATE TABLE IF NOT EXISTS verdicts (
    backup TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('good', 'bad')),
    checked_ns INTEGER NOT NULL,
    problem TEXT
)
"""

# The RBD snapshots backups take their point in time from (engine/rbdsnaps.py).
# A row is written before its snapshot is made (``backup`` NULL: being
# taken, an intent), gets the snapshot's id once made, and names its backup
# in the backup's own commit; the device's newest backup's snapshot is
# kept, every other one is removed and its row forgotten.
_RBD_SNAPSHOTS = """
CREATE TABLE IF NOT EXISTS rbd_snapshots (
    name TEXT NOT NULL,
    device TEXT NOT NULL,
    snap_id INTEGER,
    backup TEXT,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (device, name)
)
"""

# Off-site copies (engine/remote/): each remote's name, s3:// URL, endpoint
# and region. Never credentials: those come from the S3 tools' own chain.
_REMOTES = """
CREATE TABLE IF NOT EXISTS remotes (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    endpoint TEXT,
    region TEXT,
    created_ns INTEGER NOT NULL
)
"""

DISK_FULL = "the repository's disk is full"  # why a catalog is frozen


class CatalogError(ErrnoError):
    """The catalog cannot be opened, read or written (ENOSPC when its disk is full)."""


@dataclass(frozen=True)
class DeviceRecord:
    name: str
    source: str
    size: int
    granularity: int
    created_ns: int
    # What the source path led to when it was bound (None: a catalog from
    # before identities were kept, until the device's next open records it).
    identity: SourceId | None = None
    # How its backups store clusters unless a backup says otherwise: "none" or "zstd".
    compress: str = "none"
    # An RBD source's cluster configuration and client (engine/ceph.py, JSON); None otherwise.
    ceph: str | None = None


@dataclass(frozen=True)
class RbdSnapshotRow:
    """An RBD snapshot backupfs took (see _RBD_SNAPSHOTS)."""

    device: str
    name: str
    snap_id: int | None
    backup: str | None


@dataclass(frozen=True)
class BackupRecord:
    id: str
    device: str
    seq: int
    kind: str
    parent: str | None
    created_ns: int
    size: int
    cluster_size: int
    granularity: int
    image: str  # relative to the repository
    checksums: str | None
    stored_bytes: int
    label: str | None = None
    scanned: bool = False
    state: str = "complete"

    @property
    def created(self) -> float:
        return self.created_ns / 1e9


@dataclass(frozen=True)
class JobRecord:
    id: int
    device: str
    kind: str
    started_ns: int
    finished_ns: int | None
    state: str
    backup: str | None
    bytes_total: int | None
    bytes_done: int | None
    bytes_written: int | None
    scanned: bool
    error: str | None


_BACKUP_COLUMNS = (
    "id, device, seq, kind, parent, created_ns, size, cluster_size, granularity, "
    "image, checksums, stored_bytes, label, scanned, state"
)
_JOB_COLUMNS = (
    "id, device, kind, started_ns, finished_ns, state, backup, bytes_total, bytes_done, "
    "bytes_written, scanned, error"
)


class Catalog:
    def __init__(self, conn: sqlite3.Connection, path: str, frozen: str | None = None) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.RLock()
        # Why it could only be opened for reading (a full disk), or None.
        self.frozen = frozen
        # A catalog opened read-only may predate the column: read NULL then.
        columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
        identity = "source_identity" if "source_identity" in columns else "NULL"
        compress = "compress" if "compress" in columns else "'none'"
        ceph = "ceph" if "ceph" in columns else "NULL"
        self._device_columns = f"name, source, size, granularity, created_ns, {identity}, {compress}, {ceph}"

    # -- opening -------------------------------------------------------------

    @staticmethod
    def _connect(path: str, readonly: bool = False, immutable: bool = False) -> sqlite3.Connection:
        if readonly:
            # Another process owns the repository (a mount): read beside it.
            # Immutable: no -shm or -wal at all (see open()).
            uri = "file:" + path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
            if immutable:
                uri += "&immutable=1"
            return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> None:
        """Our settings; they write to the file (WAL), so only once it is known to be ours."""
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")

    @classmethod
    def create(cls, path: str, group: int | None = None) -> Catalog:
        """A new catalog at ``path``; ``group``: the gid the repository is shared with."""
        # Made here, with the mode its directory calls for, before SQLite
        # opens it: SQLite gives the -wal and -shm files the database's mode.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            set_new_file_mode(fd, path)
        finally:
            os.close(fd)
        conn = cls._connect(path)
        cls._configure(conn)
        shared = "" if group is None else f"INSERT INTO meta VALUES ('group', '{int(group)}');\n"
        conn.executescript(
            "BEGIN;\n"
            + _SCHEMA
            + f"INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');\n{shared}COMMIT;"
        )
        _add_source_identity(conn)
        _add_device_compress(conn)
        _add_device_ceph(conn)
        cat = cls(conn, path)
        cat._upgrade_intents()
        cat._upgrade_verdicts()
        cat._upgrade_rbd_snapshots()
        cat._upgrade_remotes()
        return cat

    @classmethod
    def open(cls, path: str, readonly: bool = False) -> Catalog:
        """Open for use; ``readonly`` beside the process that owns it.

        A full disk leaves no room for the -wal and -shm files SQLite needs
        even to read. Opened by the owner (the caller holds the repository's
        lock, so nobody else writes) with nothing left in the WAL, the file
        itself is the whole catalog: it is then opened frozen, so that
        `list`, `status` and `restore` work while the disk is full (that is
        when an operator needs them), and every write says the disk is full.
        """
        frozen = None
        try:
            try:
                conn = cls._connect(path, readonly)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError as e:
                if not any(s in str(e) for s in ("disk I/O error", "disk is full", "unable to open")):
                    raise
                if readonly or not _disk_full(path) or not _wal_empty(path):
                    hint = f"; {DISK_FULL}" if _disk_full(path) else ""
                    raise CatalogError(f"{path}: cannot open the catalog ({e}{hint})", errno.ENOSPC if hint
                                       else errno.EIO) from None
                conn = cls._connect(path, readonly=True, immutable=True)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                frozen = DISK_FULL
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"{path}: not a backupfs catalog ({e})") from None
        if row is None:
            conn.close()
            raise CatalogError(f"{path}: catalog has no schema version")
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            conn.close()
            raise CatalogError(f"{path}: catalog schema version {row[0]!r} is not one backupfs knows") from None
        if version > SCHEMA_VERSION:
            conn.close()
            raise CatalogError(
                f"{path}: repository format {version} is newer than this backupfs understands "
                f"({SCHEMA_VERSION}); upgrade backupfs"
            )
        if not readonly and frozen is None:
            try:
                cls._configure(conn)
                _add_source_identity(conn)
                _add_device_compress(conn)
                _add_device_ceph(conn)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise CatalogError(f"{path}: cannot open the catalog for writing ({e})") from None
        catalog = cls(conn, path, frozen)
        if not readonly and frozen is None:
            try:
                catalog._upgrade_intents()
                catalog._upgrade_verdicts()
                catalog._upgrade_rbd_snapshots()
                catalog._upgrade_remotes()
            except CatalogError as e:
                if e.errno != errno.ENOSPC:
                    conn.close()
                    raise
                catalog.frozen = DISK_FULL  # no room to add the table: read-only until there is
        return catalog

    def _upgrade_intents(self) -> None:
        """Add the ``intents`` table to a catalog made before it existed.

        Idempotent, and within SCHEMA_VERSION 1: an older backupfs ignores
        the table. A catalog opened read-only may not have it: ``intents``
        then reads as empty.
        """
        if self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'intents'"):
            return  # no write (and no flush) on every open
        with self.transaction() as c:
            c.execute(_INTENTS)

    def _upgrade_verdicts(self) -> None:
        """Add the ``verdicts`` table (what verify found) to a catalog made
        before it existed: idempotent, within SCHEMA_VERSION 1 (an older
        backupfs ignores it); read-only, a catalog without it has no verdicts."""
        if self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'verdicts'"):
            return
        with self.transaction() as c:
            c.execute(_VERDICTS)

    def _upgrade_rbd_snapshots(self) -> None:
        """Add the ``rbd_snapshots`` table to a catalog made before it: as ``_upgrade_verdicts``."""
        if self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rbd_snapshots'"):
            return
        with self.transaction() as c:
            c.execute(_RBD_SNAPSHOTS)

    def _upgrade_remotes(self) -> None:
        """Add the ``remotes`` table to a catalog made before it: as ``_upgrade_verdicts``."""
        if self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'remotes'"):
            return
        with self.transaction() as c:
            c.execute(_REMOTES)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- remotes -------------------------------------------------------------------

    def remotes(self) -> list[RemoteSpec]:
        """Every remote, by name, each checked as it is loaded; none in a catalog
        read-only and not yet upgraded."""
        try:
            rows = self._query("SELECT name, url, endpoint, region FROM remotes ORDER BY name")
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        out = []
        for name, url, endpoint, region in rows:
            try:
                spec = RemoteSpec(validate_remote_name(name), url, validate_endpoint(endpoint), region)
                spec.location  # noqa: B018 (the URL parses)
            except UsageError as e:
                raise _tampered(self.path, f"remote {name!r}", str(e)) from None
            out.append(spec)
        return out

    def add_remote(self, spec: RemoteSpec) -> None:
        with self.transaction() as c:
            c.execute(_REMOTES)  # beside a mount whose daemon predates the table
            if c.execute("SELECT 1 FROM remotes WHERE name = ?", (spec.name,)).fetchone():
                raise CatalogError(f"a remote named {spec.name} exists already", errno.EEXIST)
            c.execute("INSERT INTO remotes VALUES (?, ?, ?, ?, ?)",
                      (spec.name, spec.url, spec.endpoint, spec.region, time.time_ns()))
            # What this repository's pushes sign a remote with (see origin()).
            c.execute("INSERT OR IGNORE INTO meta VALUES ('origin', ?)", (secrets.token_hex(16),))

    def origin(self) -> str | None:
        """This repository's random token, made with its first remote: a remote
        records the token of the repository that first pushed to it, and a push
        from another repository is refused (it would delete that one's backups)."""
        rows = self._query("SELECT value FROM meta WHERE key = 'origin'")
        return str(rows[0][0]) if rows else None

    def remove_remote(self, name: str) -> bool:
        """Forget a remote (what it holds stays there); whether there was one."""
        with self.transaction() as c:
            c.execute(_REMOTES)
            return c.execute("DELETE FROM remotes WHERE name = ?", (name,)).rowcount > 0

    @contextmanager
    def transaction(self, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; ``flush=False`` for bookkeeping a crash may lose.

        Without the flush the commit is ordered in the WAL but not fsynced;
        the next flushed commit makes it durable too. Only what a backup's
        visibility depends on pays for a disk flush.
        """
        if self.frozen:
            raise CatalogError(
                f"{self.path}: {self.frozen}; nothing can be recorded until there is room "
                "(list, status, verify and restore still work)", errno.ENOSPC)
        with self._lock:
            if not flush:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if _disk_full(self.path):
                    raise CatalogError(f"{self.path}: cannot record it, the repository's disk is full ({e})",
                                       errno.ENOSPC) from None
                # An I/O error writing or flushing the catalog (a failing
                # disk): nothing was recorded, which the user must be told
                # plainly, not as an internal error.
                raise CatalogError(f"{self.path}: cannot record it in the catalog ({e})") from None
            finally:
                if not flush:
                    self._conn.execute("PRAGMA synchronous=FULL")
            if flush:
                durable.fs.catalog_committed(self.path)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def group(self) -> int | None:
        """The gid ``init --group`` shared the repository with; None: private."""
        rows = self._query("SELECT value FROM meta WHERE key = 'group'")
        if not rows:
            return None
        try:
            gid = int(rows[0][0])
        except (TypeError, ValueError):
            gid = -1
        if not 0 <= gid < 2**32 - 1:
            raise CatalogError(f"{self.path}: the recorded group {rows[0][0]!r} is not a group id")
        return gid

    # -- devices -----------------------------------------------------------------

    def add_device(self, name: str, source: str, size: int, granularity: int,
                   backups: Sequence[BackupRecord] = (), identity: SourceId | None = None,
                   compress: str = "none", ceph: str | None = None) -> DeviceRecord:
        """Add a device, with ``backups`` (an import) in the same commit: all or none."""
        rec = DeviceRecord(name, source, size, granularity, time.time_ns(), identity, compress, ceph)
        try:
            with self.transaction() as c:
                c.execute(
                    "INSERT INTO devices (name, source, size, granularity, created_ns, source_identity) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (rec.name, rec.source, rec.size, rec.granularity, rec.created_ns,
                     identity.encode() if identity else None),
                )
                if compress != "none":  # the column's default otherwise
                    c.execute("UPDATE devices SET compress = ? WHERE name = ?", (compress, name))
                if ceph is not None:
                    c.execute("UPDATE devices SET ceph = ? WHERE name = ?", (ceph, name))
                for b in backups:
                    self._insert_backup(c, b)
        except sqlite3.IntegrityError:
            raise CatalogError(f"device {name!r} already exists") from None
        return rec

    def set_source(self, name: str, source: str, identity: SourceId, ceph: str | None = None) -> None:
        """Bind a device to the source its next backups read, and to what that
        path leads to now (an imported archive's source, or a rebind);
        ``ceph``: an RBD source's cluster settings."""
        with self.transaction() as c:
            c.execute("UPDATE devices SET source = ?, source_identity = ?, ceph = ? WHERE name = ?",
                      (source, identity.encode(), ceph, name))

    def set_compress(self, name: str, compress: str) -> None:
        """The device's default compression for its next backups ("none" or "zstd")."""
        with self.transaction() as c:
            c.execute("UPDATE devices SET compress = ? WHERE name = ?", (compress, name))

    def record_source_identity(self, name: str, identity: SourceId) -> None:
        """Keep the identity of a source bound before identities were kept
        (its first open since): from then on it is held by it."""
        with self.transaction() as c:
            c.execute("UPDATE devices SET source_identity = ? WHERE name = ? AND source_identity IS NULL",
                      (identity.encode(), name))

    def remove_device(self, name: str, leftovers: Sequence[tuple[str, str]] = ()) -> None:
        """Forget a device; ``leftovers`` (path, kind): its files, recorded as
        intents in the same commit, so that they are deleted even after a crash."""
        with self.transaction() as c:
            self._insert_intents(c, leftovers)
            c.execute("DELETE FROM jobs WHERE device = ?", (name,))
            c.execute("DELETE FROM backups WHERE device = ?", (name,))
            c.execute("DELETE FROM devices WHERE name = ?", (name,))
            if self._has_table(c, "rbd_snapshots"):
                c.execute("DELETE FROM rbd_snapshots WHERE device = ?", (name,))

    def device(self, name: str) -> DeviceRecord | None:
        rows = self._query(f"SELECT {self._device_columns} FROM devices WHERE name = ?", (name,))
        return self._device(rows[0]) if rows else None

    def devices(self) -> list[DeviceRecord]:
        return [self._device(r) for r in self._query(f"SELECT {self._device_columns} FROM devices ORDER BY name")]

    def _device(self, row: tuple) -> DeviceRecord:
        name, source, size, granularity, created_ns, identity, compress, ceph = row
        try:
            held = SourceId.decode(identity) if identity is not None else None
        except (ValueError, AttributeError):
            raise CatalogError(f"{self.path}: device {name!r} has a source identity that is not one "
                               f"backupfs writes ({identity!r})") from None
        return check_device_row(self.path, DeviceRecord(name, source, size, granularity, created_ns, held,
                                                        compress, ceph))

    # -- backups -------------------------------------------------------------------

    def next_seq(self) -> int:
        """A sequence number no other backup of the repository has or will get.

        Repository-wide (not per device) and allocated in a transaction, so
        backups of two devices triggered in the same second never share an
        id, and ids taken within one second still sort in order.
        """
        # No flush: if a crash loses this, it also lost the backup that used it.
        with self.transaction(flush=False) as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            used = c.execute("SELECT COALESCE(MAX(seq), 0) FROM backups").fetchone()[0]
            seq = max(int(row[0]) if row else 1, int(used) + 1)
            c.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (str(seq + 1),))
        return seq

    def add_backup(self, rec: BackupRecord, job: tuple[int, dict] | None = None,
                   rbd_snapshot: str | None = None) -> None:
        """Make a backup visible; ``job`` = (job id, job_finished fields) in the same commit,
        and ``rbd_snapshot`` (the RBD snapshot it was read from) named as its."""
        with self.transaction() as c:
            if job is not None:
                self._finish_job(c, job[0], "succeeded", **job[1])
            self._insert_backup(c, rec)
            if rbd_snapshot is not None:
                c.execute("UPDATE rbd_snapshots SET backup = ? WHERE device = ? AND name = ?",
                          (rec.id, rec.device, rbd_snapshot))

    # -- RBD snapshots ---------------------------------------------------------------

    @staticmethod
    def _has_table(c: sqlite3.Connection, table: str) -> bool:
        return c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() \
            is not None

    def rbd_snapshot_intent(self, device: str, name: str) -> None:
        """Record, durably, an RBD snapshot about to be taken (removed if no backup names it)."""
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO rbd_snapshots VALUES (?, ?, NULL, NULL, ?)",
                      (name, device, time.time_ns()))

    def rbd_snapshot_taken(self, device: str, name: str, snap_id: int, flush: bool = True) -> None:
        """The snapshot is made: its id, which tells it from one made anew under its name."""
        with self.transaction(flush=flush) as c:
            c.execute("UPDATE rbd_snapshots SET snap_id = ? WHERE device = ? AND name = ?", (snap_id, device, name))

    def rbd_snapshots(self, device: str) -> list[RbdSnapshotRow]:
        """The device's recorded RBD snapshots, oldest first."""
        try:
            rows = self._query("SELECT device, name, snap_id, backup FROM rbd_snapshots WHERE device = ? "
                               "ORDER BY created_ns", (device,))
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        return [check_rbd_snapshot_row(self.path, RbdSnapshotRow(d, n, i, b)) for d, n, i, b in rows]

    def forget_rbd_snapshot(self, device: str, name: str) -> None:
        """The snapshot is removed (or was never made)."""
        with self.transaction(flush=False) as c:
            c.execute("DELETE FROM rbd_snapshots WHERE device = ? AND name = ?", (device, name))

    @staticmethod
    def _insert_backup(c: sqlite3.Connection, rec: BackupRecord) -> None:
        c.execute(
            f"INSERT INTO backups ({_BACKUP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.id, rec.device, rec.seq, rec.kind, rec.parent, rec.created_ns, rec.size,
                rec.cluster_size, rec.granularity, rec.image, rec.checksums, rec.stored_bytes,
                rec.label, int(rec.scanned), rec.state,
            ),
        )

    def _backup(self, row: tuple) -> BackupRecord:
        (bid, dev, seq, kind, parent, created, size, cs, gran, image, sums, stored, label, scanned, state) = row
        return check_backup_row(self.path, BackupRecord(bid, dev, seq, kind, parent, created, size, cs, gran, image,
                                                        sums, stored, label, bool(scanned), state))

    def backups(self, device: str | None = None) -> list[BackupRecord]:
        if device is None:
            rows = self._query(f"SELECT {_BACKUP_COLUMNS} FROM backups ORDER BY device, seq")
        else:
            rows = self._query(f"SELECT {_BACKUP_COLUMNS} FROM backups WHERE device = ? ORDER BY seq", (device,))
        return [self._backup(r) for r in rows]

    def backup(self, backup_id: str) -> BackupRecord | None:
        rows = self._query(f"SELECT {_BACKUP_COLUMNS} FROM backups WHERE id = ?", (backup_id,))
        return self._backup(rows[0]) if rows else None

    def latest_backup(self, device: str) -> BackupRecord | None:
        rows = self._query(
            f"SELECT {_BACKUP_COLUMNS} FROM backups WHERE device = ? ORDER BY seq DESC LIMIT 1", (device,)
        )
        return self._backup(rows[0]) if rows else None

    def last_full(self, device: str) -> BackupRecord | None:
        rows = self._query(
            f"SELECT {_BACKUP_COLUMNS} FROM backups WHERE device = ? AND kind = 'full' "
            "ORDER BY seq DESC LIMIT 1",
            (device,),
        )
        return self._backup(rows[0]) if rows else None

    def children(self, backup_id: str) -> list[BackupRecord]:
        rows = self._query(f"SELECT {_BACKUP_COLUMNS} FROM backups WHERE parent = ? ORDER BY seq", (backup_id,))
        return [self._backup(r) for r in rows]

    def begin_removal(self, backup_id: str) -> None:
        """Record the intent to remove a backup, before its children's images change."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO pending_removals VALUES (?)", (backup_id,))

    def pending_removals(self) -> list[str]:
        return [r[0] for r in self._query("SELECT backup FROM pending_removals")]

    def apply_removal(self, removed: str, updates: list[tuple[str, str | None, str, int]],
                      leftovers: Sequence[str] = ()) -> None:
        """In one transaction: re-point children (id, new parent, kind, stored bytes), drop
        ``removed``, and record its files (``leftovers``) as intents for deletion.

        The children's verdicts go too: each child's image was rewritten
        (the merge), and what verify found of the old file, its structure
        say, is not true of the new one; kept, a bad one refused every
        incremental onto the sound new image until the next verify."""
        with self.transaction() as c:
            self._insert_intents(c, [(p, "file") for p in leftovers])
            for child, parent, kind, stored in updates:
                c.execute(
                    "UPDATE backups SET parent = ?, kind = ?, stored_bytes = ? WHERE id = ?",
                    (parent, kind, stored, child),
                )
            if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'verdicts'").fetchone():
                c.executemany("DELETE FROM verdicts WHERE backup = ?",
                              [(removed,)] + [(child,) for child, *_ in updates])
            c.execute("DELETE FROM pending_removals WHERE backup = ?", (removed,))
            c.execute("DELETE FROM backups WHERE id = ?", (removed,))

    # -- intents -----------------------------------------------------------------

    def record_intents(self, kind: str, paths: Sequence[str]) -> None:
        """Record, durably, files (relative to the repository) about to be made.

        ``kind`` says what makes them: 'file' or 'dir' (a device directory
        an import creates).
        """
        with self.transaction() as c:
            self._insert_intents(c, [(p, kind) for p in paths])

    @staticmethod
    def _insert_intents(c: sqlite3.Connection, intents: Sequence[tuple[str, str]]) -> None:
        now = time.time_ns()
        c.executemany("INSERT OR REPLACE INTO intents VALUES (?, ?, ?)", [(p, k, now) for p, k in intents])

    def clear_intents(self, paths: Sequence[str]) -> None:
        """Forget intents whose files are committed or removed (a crash that
        loses this leaves intents recovery finds settled: no flush)."""
        with self.transaction(flush=False) as c:
            c.executemany("DELETE FROM intents WHERE path = ?", [(p,) for p in paths])

    def intents(self) -> list[tuple[str, str]]:
        """(path, kind) of every recorded intent; none in a catalog not yet upgraded."""
        try:
            return [(str(p), str(k)) for p, k in self._query("SELECT path, kind FROM intents ORDER BY path")]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise

    def lineage(self, backup_id: str) -> list[BackupRecord]:
        """The backup and its ancestors, newest first."""
        out: list[BackupRecord] = []
        seen: set[str] = set()
        current: str | None = backup_id
        while current is not None:
            if current in seen:
                raise CatalogError(f"catalog lineage of {backup_id} loops at {current}")
            seen.add(current)
            rec = self.backup(current)
            if rec is None:
                raise CatalogError(f"backup {current} is missing from the catalog")
            out.append(rec)
            current = rec.parent
        return out

    # -- verdicts ----------------------------------------------------------------------

    def record_verdicts(self, verdicts: dict[str, str | None]) -> None:
        """Keep what a verify found: backup id -> its first problem (bad), or
        None (good: clears an earlier bad verdict). Bookkeeping a crash may
        lose (no flush): the next verify says it again."""
        now = time.time_ns()
        with self.transaction(flush=False) as c:
            c.executemany(
                "INSERT OR REPLACE INTO verdicts (backup, state, checked_ns, problem) VALUES (?, ?, ?, ?)",
                [(b, "good" if p is None else "bad", now, p) for b, p in verdicts.items()],
            )

    def bad_verdicts(self, backup_ids: Sequence[str]) -> dict[str, str]:
        """Those of ``backup_ids`` the last verify found bad: id -> its problem."""
        out: dict[str, str] = {}
        ids = list(backup_ids)
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            part = ids[start : start + 500]
            try:
                rows = self._query(
                    f"SELECT backup, problem FROM verdicts WHERE state = 'bad' AND backup IN "
                    f"({', '.join('?' * len(part))})", tuple(part))
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return {}  # opened read-only, not yet upgraded: nothing was ever found bad
                raise
            out.update((str(b), str(p or "damaged")) for b, p in rows)
        return out

    # -- jobs --------------------------------------------------------------------------

    def job_started(self, device: str, kind: str) -> int:
        with self.transaction(flush=False) as c:  # history: a crash may lose it
            cur = c.execute(
                "INSERT INTO jobs (device, kind, started_ns, state) VALUES (?, ?, ?, 'running')",
                (device, kind, time.time_ns()),
            )
            return int(cur.lastrowid or 0)

    def job_finished(
        self,
        job_id: int,
        state: str,
        *,
        backup: str | None = None,
        total: int | None = None,
        done: int | None = None,
        written: int | None = None,
        scanned: bool = False,
        error: str | None = None,
    ) -> None:
        with self.transaction(flush=False) as c:
            self._finish_job(c, job_id, state, backup=backup, total=total, done=done, written=written,
                             scanned=scanned, error=error)

    @staticmethod
    def _finish_job(
        c: sqlite3.Connection, job_id: int, state: str, *, backup: str | None = None, total: int | None = None,
        done: int | None = None, written: int | None = None, scanned: bool = False, error: str | None = None,
    ) -> None:
        c.execute(
            "UPDATE jobs SET finished_ns = ?, state = ?, backup = ?, bytes_total = ?, bytes_done = ?, "
            "bytes_written = ?, scanned = ?, error = ? WHERE id = ?",
            (time.time_ns(), state, backup, total, done, written, int(scanned), error, job_id),
        )

    def jobs(self, device: str | None = None, limit: int = 20) -> list[JobRecord]:
        if device is None:
            rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE device = ? ORDER BY id DESC LIMIT ?", (device, limit)
            )
        return [JobRecord(*r[:10], bool(r[10]), r[11]) for r in rows]

    def mark_interrupted_jobs(self) -> int:
        """Jobs a crashed process left 'running' did not finish."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = 'interrupted', finished_ns = ?, "
                "error = 'the process stopped while the job ran' WHERE state = 'running'",
                (time.time_ns(),),
            )
            return cur.rowcount


def _add_device_column(conn: sqlite3.Connection, name: str, declaration: str) -> None:
    """Add column ``name`` to ``devices`` unless it is there: an upgrade step,
    idempotent, run whenever the catalog is opened for writing. The schema
    version stays: an older backupfs still reads the catalog (it names the
    columns it reads). One that cannot add it now (a failing disk) opens
    without it: the column reads as its default, and a write to it fails as
    any write to the catalog would."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
    if name not in columns:
        try:
            conn.execute(f"ALTER TABLE devices ADD COLUMN {name} {declaration}")
        except sqlite3.OperationalError:
            pass


def _add_source_identity(conn: sqlite3.Connection) -> None:
    """The column that holds each device's source identity (see
    engine/sourceid.py). NULL (a catalog from before it) is recorded at the
    device's next open."""
    _add_device_column(conn, "source_identity", "TEXT")


def _add_device_compress(conn: sqlite3.Connection) -> None:
    """The column that holds each device's default compression, 'none' for the
    devices of a catalog from before it (their backups were all uncompressed)."""
    _add_device_column(conn, "compress", "TEXT NOT NULL DEFAULT 'none'")


def _add_device_ceph(conn: sqlite3.Connection) -> None:
    """The column that holds an RBD source's cluster settings (NULL for every other source)."""
    _add_device_column(conn, "ceph", "TEXT")


def _tampered(path: str, row: str, problem: str) -> CatalogError:
    """The refusal of a row no backupfs wrote: it names the catalog and the row."""
    return CatalogError(f"{path}: {row}: {problem}; the catalog was changed outside backupfs, "
                        "and backupfs reads and deletes nothing it names")


def check_device_row(path: str, rec: DeviceRecord) -> DeviceRecord:
    """A device row as backupfs writes it: its name is a directory under
    devices/ and a file name in the mount, its source an absolute path.

    A catalog edited by hand (or by an intruder) must not make backupfs
    open or delete anything outside the repository.
    """
    if not isinstance(rec.name, str) or not NAME_RE.fullmatch(rec.name):
        raise _tampered(path, f"device {rec.name!r}", "the name breaks the device-name rule")
    if not isinstance(rec.source, str) or "\0" in rec.source or (
            rec.source and not rec.source.startswith("/") and not is_rbd(rec.source)):
        raise _tampered(path, f"device {rec.name}", f"its source {rec.source!r} is not an absolute path")
    if is_rbd(rec.source):
        try:
            from_record(rec.source, rec.ceph)
        except CephError as e:
            raise _tampered(path, f"device {rec.name}", str(e)) from None
    if rec.compress not in ("none", "zstd"):
        raise _tampered(path, f"device {rec.name}", f"its compression {rec.compress!r} is not none or zstd")
    return rec


def check_rbd_snapshot_row(path: str, row: RbdSnapshotRow) -> RbdSnapshotRow:
    """An rbd_snapshots row as backupfs writes it: backupfs removes the
    snapshot a row names, so one it did not write (a user's snapshot's
    name, an id that is no id) must never be acted on."""
    where = f"RBD snapshot {row.name!r} of device {row.device!r}"
    name = row.name
    if not isinstance(name, str) or not name.startswith("backupfs-") \
            or not BACKUP_ID_RE.fullmatch(name[len("backupfs-"):]):
        raise _tampered(path, where, "the name is not one backupfs gives its snapshots")
    if row.snap_id is not None and (type(row.snap_id) is not int or row.snap_id < 0):
        raise _tampered(path, where, f"its id {row.snap_id!r} is not a snapshot id")
    if row.backup is not None and (not isinstance(row.backup, str) or not BACKUP_ID_RE.fullmatch(row.backup)):
        raise _tampered(path, where, f"its backup {row.backup!r} is not a backup id")
    return row


def check_backup_row(path: str, rec: BackupRecord) -> BackupRecord:
    """A backup row as backupfs writes it: valid id, device and parent
    names, and image and checksum files directly in devices/<device>/."""
    if not isinstance(rec.id, str) or not BACKUP_ID_RE.fullmatch(rec.id):
        raise _tampered(path, f"backup {rec.id!r}", "the id is not a backup id")
    row = f"backup {rec.id}"
    if not isinstance(rec.device, str) or not NAME_RE.fullmatch(rec.device):
        raise _tampered(path, row, f"its device name {rec.device!r} breaks the device-name rule")
    if rec.parent is not None and (not isinstance(rec.parent, str) or not BACKUP_ID_RE.fullmatch(rec.parent)):
        raise _tampered(path, row, f"its parent {rec.parent!r} is not a backup id")
    for what, value in (("image", rec.image), ("checksum file", rec.checksums)):
        if value is None and what == "checksum file":
            continue
        if not _in_device_dir(value, rec.device):
            raise _tampered(path, row, f"its {what} path {value!r} does not lie in "
                            f"devices/{rec.device}/ of the repository")
    return rec


def _in_device_dir(value: object, device: str) -> bool:
    """``devices/<device>/<file>``, relative, one plain file name at the end."""
    if not isinstance(value, str):
        return False
    prefix = device_rel(device) + "/"
    name = value[len(prefix):]
    return (value.startswith(prefix) and name not in ("", ".", "..") and "/" not in name
            and "\0" not in name)


def _wal_empty(path: str) -> bool:
    """No committed transaction waits in the WAL (it is checkpointed at each clean close)."""
    try:
        return os.path.getsize(path + "-wal") == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _disk_full(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024
