"""The history view of the mounted tree: what changed in each backup, and every version of a file.

::

    MOUNT/<device>/changes/              one read-only text file per backup id, as backups/
    MOUNT/<device>/changes/<id>       r  what changed between <id>'s parent and <id>
    MOUNT/<device>/versions/             the volumes (p1, disk, lvm-<vg>-<lv>)
    MOUNT/<device>/versions/<volume>/<path...>/
                                         a directory: the names in the newest backup holding it
                                         a regular file: one file per distinct version, named by
                                         the id of the first backup that held it

``changes/`` is the catalog's (nothing parsed to list it or to stat its
files). A ``changes/<id>`` file's text is ``render(history.changes(rec))``,
computed in a worker thread when it is opened (engine/history/). Its size
in stat is 0 and it is served with ``direct_io``, as /proc's files are:
every reader that reads to the end (cat, wc, less, tail, cp, Python's
``read``) gets the whole text, and ``ls -l changes/`` of 1,000 backups
costs one catalog row each and no comparison. The other choice, computing
the diff on every stat, would run up to 1,000 diffs for that ``ls -l`` (each
opens two backups' filesystems: tenths of a second to seconds), or show a
size that changes once the cache has it. A full backup has no parent: its
file is empty. Measured (1,000 backups of a 64 MiB ext4 device, one chain,
2 shared cores): ``ls -l changes/`` 0.55-0.9 s against 0.45-0.67 s for
``ls -l backups/``; the first ``cat`` of a changes file 0.5 s (0.25 s with
50 backups), 0.01 s again (the pair's comparison is cached).

In ``versions/``, a path's node is decided by the newest backup that holds
it as a directory or a regular file (backups where it is something else,
or missing, are passed over): a directory lists the names its newest
holder has (directories and regular files only: what can be looked into
here), a regular file lists its versions (``History.versions``). A name
looked up resolves in older backups too, so a deleted file is still
reached by name: a name not in the newest backup is looked for in the
names its directory held in any backup, gathered once per directory (one
look into each backup, their parsed listings shared with ``files/``
through FilesCache) and kept, per directory, until the device's backups
change (a new backup adds only its own look). A path directory has the guest's owner and
permissions of its newest holder (a file's read bits become a directory's
read and search bits), so ``default_permissions`` keeps host users out of
what the guest kept from them, as in ``files/``. A version file has that
version's guest attributes and bytes, read from the first backup holding it.
Versions of a path are cached per path until the device's backups change
(the key holds their ids). Measured, a file with 50 versions in 50
backups: ``ls -l`` of its directory 0.7 s first, 0.13 s again. Both the
versions and a name's first miss in a directory look into every backup,
and opening a backup costs with its chain's depth: with 1,000 backups in
one chain, 130-195 s and 44-92 s the first time (then 0.4-1.2 s and 0.1 s).
 Names and attributes under ``versions/`` are
kept by the kernel for ``VERSIONS_TIMEOUT`` only: a new backup or a prune
changes them.
"""

from __future__ import annotations

import errno
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from backupfs.filescache import FilesCache
from backupfs.tree import BACKUP_TIMEOUT, BIG_BLKSIZE, DEVDIR, Attributes, Listing, Node, RequestError, Tree
from engine.catalog import BackupRecord
from engine.guest.guestdisk import GuestDisk
from engine.guest.guestfs import GuestEntry
from engine.guest.reader import GuestDamaged
from engine.guest.volume import GuestPath, Volume
from engine.history.changes import render
from engine.history.history import History
from engine.history.versions import Version

CHANGES, CHANGES_FILE = "changes", "changesfile"
VERSIONS, VERSIONS_PATH, VERSION_FILE = "versions", "versionspath", "versionfile"
HISTORY_KINDS = (CHANGES, CHANGES_FILE, VERSIONS, VERSIONS_PATH, VERSION_FILE)
VERSIONS_TIMEOUT = 1.0  # seconds the kernel keeps a versions/ name or attribute
CACHED_PATHS = 256  # paths whose versions are kept
CACHED_DIRS = 256  # directories whose names in all backups are kept


class HistoryView:
    """Registers the history kinds into ``tree`` and answers for them."""

    def __init__(self, tree: Tree, disks: FilesCache, history: History, owner_only: bool = False) -> None:
        """``owner_only``: ``files_owner_only``: changes/ and versions/ are 0500, so the
        kernel keeps other users out of what it cached from the owner's walk."""
        self.owner_only = owner_only
        self.tree = tree
        self.repo = tree.repo
        self.inodes = tree.inodes
        self.disks = disks
        self.history = history
        self._lock = threading.Lock()
        self._versions: OrderedDict[tuple[str, str, GuestPath], tuple[tuple[str, ...], list[Version]]] = \
            OrderedDict()
        self._names: OrderedDict[tuple[str, str, GuestPath], tuple[tuple[str, ...], dict[bytes, str]]] = \
            OrderedDict()
        self._volumes: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {}  # device -> (ids, names)
        tree.devdir_entries.append(("changes", CHANGES))
        tree.devdir_entries.append(("versions", VERSIONS))
        tree.register(CHANGES, DEVDIR, listing=self._changes_entries, lookup=self._changes_child,
                      describe=self._describe_changes_dir)
        tree.register(CHANGES_FILE, CHANGES, check=self._backup_exists, describe=self._describe_changes_file,
                      text=self._changes_text)
        tree.register(VERSIONS, DEVDIR, listing=self._volume_entries, lookup=self._volume_child,
                      describe=self._describe_versions_dir, blocking=True)
        tree.register(VERSIONS_PATH, None, listing=self._path_entries, lookup=self._path_child,
                      check=self._path_exists, describe=self._describe_path, parent=self._path_parent,
                      blocking=True)
        tree.register(VERSION_FILE, None, check=self._version_exists, describe=self._describe_version,
                      parent=self._version_parent, blocking=True)

    # -- changes/ ----------------------------------------------------------------------------

    def _changes_entries(self, node: Node) -> Listing:
        assert node.device is not None
        return [(b.id.encode(), self.inodes.get(CHANGES_FILE, node.device, b.id))
                for b in self.repo.backups(node.device)]

    def _changes_child(self, parent: Node, name: bytes) -> Node | None:
        return self.tree.backup_child(parent, name, CHANGES_FILE, None)

    def _describe_changes_dir(self, node: Node, a: Attributes) -> None:
        a.mode = stat.S_IFDIR | (0o500 if self.owner_only else 0o555)
        a.nlink = 2
        a.entry_timeout = BACKUP_TIMEOUT  # the name; its listing follows the catalog

    def _record(self, node: Node) -> BackupRecord:
        rec = self.repo.backup_record(node.backup or "")
        if rec is None or rec.device != node.device:
            raise RequestError(errno.ENOENT)
        return rec

    def _backup_exists(self, node: Node) -> bool:
        rec = self.repo.backup_record(node.backup or "")
        return rec is not None and rec.device == node.device

    def _describe_changes_file(self, node: Node, a: Attributes) -> None:
        rec = self._record(node)
        a.mode = stat.S_IFREG | 0o444
        a.size = 0  # unknown until read: served with direct_io (the module docstring says why)
        a.mtime_ns = rec.created_ns
        # Size, mode and time never change (a prune changes a kept backup's
        # text, read with direct_io, never from the page cache).
        a.entry_timeout = a.attr_timeout = BACKUP_TIMEOUT

    def _changes_text(self, node: Node) -> bytes:
        """The file's content (blocks: fs.py calls it in a worker at open)."""
        return render(self.history.changes(self._record(node)))

    def invalidated(self, device: str) -> None:
        """After a prune: the comparisons made before it must not be reused."""
        self.history.forget()
        with self._lock:
            for key in [k for k in self._versions if k[0] == device]:
                del self._versions[key]
            for key in [k for k in self._names if k[0] == device]:
                del self._names[key]
            self._volumes.pop(device, None)

    # -- looking into backups, newest first ---------------------------------------------------

    @contextmanager
    def _volume_of(self, rec: BackupRecord, volume: str) -> Iterator[Volume | None]:
        """The volume in a backup, or None if that backup has no readable one by the name."""
        with self.disks.using(rec) as disk:
            if volume not in disk.readable():
                yield None
                return
            try:
                yield disk.volume(volume)
            except (FileNotFoundError, GuestDamaged):
                yield None

    def _entry_in(self, rec: BackupRecord, volume: str, path: GuestPath) -> GuestEntry | None:
        """``path`` in one backup, if it is a directory or a regular file there."""
        with self._volume_of(rec, volume) as vol:
            if vol is None:
                return None
            try:
                entry = vol.entry(path)
            except (FileNotFoundError, NotADirectoryError, GuestDamaged):
                return None
            return entry if entry.is_dir or entry.is_file else None

    def _holder(self, device: str, volume: str, path: GuestPath) -> tuple[BackupRecord, GuestEntry] | None:
        """The newest backup holding ``path`` as a directory or a regular file, and its entry there.

        The newest backup is looked into first (where nearly every path
        is); for the rest the parent directory's names across all backups
        (``_names_ever``) say which backup to look into."""
        backups = self.repo.backups(device)
        if not backups:
            return None
        if not path:
            for rec in reversed(backups):
                entry = self._entry_in(rec, volume, path)
                if entry is not None:
                    return rec, entry
            return None
        entry = self._entry_in(backups[-1], volume, path)
        if entry is not None:
            return backups[-1], entry
        holder = self._names_ever(device, volume, path[:-1], backups).get(path[-1])
        rec = next((b for b in backups if b.id == holder), None)
        if rec is None:
            return None
        entry = self._entry_in(rec, volume, path)
        return None if entry is None else (rec, entry)

    def _names_ever(self, device: str, volume: str, path: GuestPath,
                    backups: list[BackupRecord]) -> dict[bytes, str]:
        """Every name directory ``path`` held as a directory or regular file in any backup, with
        the newest backup holding it: one look into each backup, once; a new backup adds its
        own look, a prune (a backup gone) starts again."""
        ids = tuple(b.id for b in backups)
        key = (device, volume, path)
        with self._lock:
            cached = self._names.get(key)
            if cached is not None:
                self._names.move_to_end(key)
        start, names = 0, {}
        if cached is not None and ids[:len(cached[0])] == cached[0]:
            start, names = len(cached[0]), dict(cached[1])
            if start == len(ids):
                return cached[1]
        for rec in backups[start:]:  # oldest first: the newest holder is written last
            with self._volume_of(rec, volume) as vol:
                if vol is None:
                    continue
                try:
                    listing = vol.listing(path)
                except (FileNotFoundError, NotADirectoryError, GuestDamaged):
                    continue
                names.update((name, rec.id) for name, e in listing.items() if e.is_dir or e.is_file)
        with self._lock:
            self._names[key] = (ids, names)
            while len(self._names) > CACHED_DIRS:
                self._names.popitem(last=False)
        return names

    def _found(self, node: Node) -> tuple[BackupRecord, GuestEntry]:
        found = self._holder(node.device or "", node.volume or "", node.path)
        if found is None:
            raise RequestError(errno.ENOENT)
        return found

    # -- versions/ -----------------------------------------------------------------------------

    def _path_node(self, device: str, volume: str, path: GuestPath) -> Node:
        key = (VERSIONS_PATH, device, volume, path)
        return self.inodes.get_forgettable(key, lambda inode: Node(inode, VERSIONS_PATH, device, None, volume, path))

    def _version_node(self, device: str, volume: str, path: GuestPath, backup: str) -> Node:
        key = (VERSION_FILE, device, volume, path, backup)
        return self.inodes.get_forgettable(key, lambda inode: Node(inode, VERSION_FILE, device, backup, volume, path))

    def _volume_entries(self, node: Node) -> Listing:
        assert node.device is not None
        latest = self.repo.latest_backup(node.device)
        if latest is None:
            return []
        with self.disks.using(latest) as disk:
            names = disk.readable()
        return [(name.encode(), self._path_node(node.device, name, ())) for name in names]

    def _volume_child(self, parent: Node, name: bytes) -> Node | None:
        """A volume of the newest backup (one look), else of any backup (``_volumes_ever``):
        a name that is none, such as the ``.git`` a shell prompt asks every parent for,
        looked into every backup on every lookup (1.4 s with 200 backups, each time)."""
        assert parent.device is not None
        volume = name.decode("utf-8", "replace")
        latest = self.repo.latest_backup(parent.device)
        if latest is None:
            return None
        with self.disks.using(latest) as disk:
            if volume in disk.readable():
                return self._path_node(parent.device, volume, ())
        if volume in self._volumes_ever(parent.device):
            return self._path_node(parent.device, volume, ())
        return None

    def _volumes_ever(self, device: str) -> frozenset[str]:
        """Every readable volume's name in any backup of ``device``: one look into each
        backup, once; a new backup adds its own look, a prune starts again."""
        backups = self.repo.backups(device)
        ids = tuple(b.id for b in backups)
        with self._lock:
            cached = self._volumes.get(device)
        start, names = 0, set()
        if cached is not None and ids[:len(cached[0])] == cached[0]:
            if len(cached[0]) == len(ids):
                return cached[1]
            start, names = len(cached[0]), set(cached[1])
        for rec in backups[start:]:
            with self.disks.using(rec) as disk:
                names.update(disk.readable())
        found = frozenset(names)
        with self._lock:
            self._volumes[device] = (ids, found)
        return found

    def _describe_versions_dir(self, node: Node, a: Attributes) -> None:
        a.mode = stat.S_IFDIR | (0o500 if self.owner_only else 0o555)
        a.nlink = 2
        a.entry_timeout = BACKUP_TIMEOUT  # the name; its listing follows the backups

    def _path_entries(self, node: Node) -> Listing:
        rec, entry = self._found(node)
        device, volume = node.device or "", node.volume or ""
        if entry.is_file:
            return [(v.backup.encode(), self._version_node(device, volume, node.path, v.backup))
                    for v in self.versions(device, volume, node.path)]
        with self._volume_of(rec, volume) as vol:
            if vol is None:
                raise RequestError(errno.ENOENT)
            try:
                listing = vol.listing(node.path)
            except (FileNotFoundError, NotADirectoryError, GuestDamaged):
                raise RequestError(errno.ENOENT) from None
        return [(name, self._path_node(device, volume, node.path + (name,)))
                for name, child in sorted(listing.items()) if child.is_dir or child.is_file]

    def _path_child(self, parent: Node, name: bytes) -> Node | None:
        device, volume = parent.device or "", parent.volume or ""
        rec, entry = self._found(parent)
        if entry.is_file:
            for v in self.versions(device, volume, parent.path):
                if v.backup.encode() == name:
                    return self._version_node(device, volume, parent.path, v.backup)
            return None
        path = parent.path + (name,)
        if self._entry_in(rec, volume, path) is None \
                and name not in self._names_ever(device, volume, parent.path, self.repo.backups(device)):
            return None
        return self._path_node(device, volume, path)

    def _path_exists(self, node: Node) -> bool:
        return self._holder(node.device or "", node.volume or "", node.path) is not None

    def _path_parent(self, node: Node) -> Node:
        if not node.path:
            return self.inodes.get(VERSIONS, node.device)
        return self._path_node(node.device or "", node.volume or "", node.path[:-1])

    def _describe_path(self, node: Node, a: Attributes) -> None:
        _, e = self._found(node)
        perms = stat.S_IMODE(e.mode)
        if e.is_file:  # readable: listable and searchable
            perms = (perms & 0o444) | ((perms & 0o444) >> 2)
        a.mode = stat.S_IFDIR | perms
        a.nlink = 2
        a.uid, a.gid = e.uid, e.gid
        a.atime_ns, a.mtime_ns, a.ctime_ns = e.atime_ns, e.mtime_ns, e.ctime_ns
        a.entry_timeout = a.attr_timeout = VERSIONS_TIMEOUT

    def versions(self, device: str, volume: str, path: GuestPath) -> list[Version]:
        """The path's distinct versions, oldest first; cached until the device's backups change."""
        ids = tuple(b.id for b in self.repo.backups(device))
        key = (device, volume, path)
        with self._lock:
            cached = self._versions.get(key)
            if cached is not None and cached[0] == ids:
                self._versions.move_to_end(key)
                return cached[1]
        found = self.history.versions(device, volume, path)
        with self._lock:
            self._versions[key] = (ids, found)
            while len(self._versions) > CACHED_PATHS:
                self._versions.popitem(last=False)
        return found

    def _version(self, node: Node) -> Version:
        for v in self.versions(node.device or "", node.volume or "", node.path):
            if v.backup == node.backup:
                return v
        raise RequestError(errno.ENOENT)

    def _version_exists(self, node: Node) -> bool:
        try:
            self._version(node)
        except RequestError:
            return False
        return True

    def _version_parent(self, node: Node) -> Node:
        return self._path_node(node.device or "", node.volume or "", node.path)

    def _describe_version(self, node: Node, a: Attributes) -> None:
        e = self._version(node).entry
        a.mode = e.mode
        a.size = e.size
        a.blocks = e.blocks
        a.uid, a.gid = e.uid, e.gid
        a.atime_ns, a.mtime_ns, a.ctime_ns = e.atime_ns, e.mtime_ns, e.ctime_ns
        a.blksize = BIG_BLKSIZE
        a.entry_timeout = a.attr_timeout = VERSIONS_TIMEOUT

    # -- reading a version -------------------------------------------------------------------------

    def open_file(self, node: Node) -> tuple[GuestDisk, BackupRecord, Volume, object]:
        """Hold the version's backup's disk for an open file: (disk, record, volume, its data).
        The caller releases the disk with ``close_file``."""
        self._version(node)
        rec = self._record(node)
        disk = self.disks.acquire(rec)
        try:
            try:
                volume = disk.volume(node.volume or "")
                return disk, rec, volume, volume.data(node.path)
            except (FileNotFoundError, NotADirectoryError):
                raise RequestError(errno.ENOENT) from None
        except BaseException:
            self.disks.release(rec.id, disk)
            raise

    def close_file(self, rec: BackupRecord, disk: GuestDisk) -> None:
        self.disks.release(rec.id, disk)
