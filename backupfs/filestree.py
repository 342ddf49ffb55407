"""The files view of the mounted tree: a backup's guest files, as kinds of the tree model.

::

    MOUNT/<device>/files/               one directory per backup, and latest
    MOUNT/<device>/files/<id>/volumes   r  one line a volume, with why one has no directory
    MOUNT/<device>/files/<id>/<volume>/ the guest filesystem (p1, disk, lvm-<vg>-<lv>)
    MOUNT/<device>/files/latest      -> <id>

Nothing is parsed for ``files/`` itself (its listing is the catalog's, as
``backups/``); a backup's volumes are found when ``files/<id>`` is listed
or looked into, in a worker thread (``blocking``). A guest node is named
by its backup, volume and path; its inode is keyed by the guest's inode
number, so hard links share one, and it is forgotten when the kernel
forgets it (there may be millions).

What the guest holds is shown as the guest has it: modes, owners, times,
symlink targets (never followed here). Access is the mount's: the kernel
checks those modes (``default_permissions``), and ``files_owner_only``
(fs.py) keeps other users out altogether.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from backupfs.filescache import FilesCache
from backupfs.tree import BACKUP_TIMEOUT, BIG_BLKSIZE, DEVDIR, Attributes, Listing, Node, RequestError, Tree
from engine.catalog import BackupRecord
from engine.guest.guestdisk import GuestDisk
from engine.guest.guestfs import GuestEntry
from engine.guest.volume import Volume

FILES, FILES_BACKUP, FILES_LATEST, VOLUMES, GUEST = "files", "filesbackup", "fileslatest", "volumes", "guest"
GUEST_KINDS = (FILES_BACKUP, VOLUMES, GUEST)


class FilesView:
    """Registers the files kinds into ``tree`` and answers for them."""

    def __init__(self, tree: Tree, disks: FilesCache, owner_only: bool = False) -> None:
        """``owner_only``: ``files_owner_only`` (fs.py): a backup's directory is the
        mount owner's alone, by its mode too (the kernel checks it on cached paths)."""
        self.tree = tree
        self.owner_only = owner_only
        self.repo = tree.repo
        self.inodes = tree.inodes
        self.disks = disks
        tree.devdir_entries.append(("files", FILES))
        tree.register(FILES, DEVDIR, listing=self._files_entries, lookup=self._files_child,
                      describe=self._describe_files_dir)
        tree.register(FILES_LATEST, FILES, check=self._latest_exists, describe=tree.describe_latest,
                      link=tree.latest_target)
        tree.register(FILES_BACKUP, FILES, listing=self._backup_entries, lookup=self._backup_child,
                      check=self._backup_exists, describe=self._describe_backup_dir, blocking=True,
                      quick_attributes=True)
        tree.register(VOLUMES, FILES_BACKUP, check=self._backup_exists, describe=self._describe_volumes,
                      text=self._volumes_text, blocking=True)
        tree.register(GUEST, None, listing=self._guest_entries, lookup=self._guest_child,
                      check=self._backup_exists, describe=self._describe_guest, parent=self._guest_parent,
                      link=self._guest_target, xattrs=self._guest_xattrs, blocking=True)

    # -- files/ and files/latest ------------------------------------------------------------

    def _files_entries(self, node: Node) -> Listing:
        assert node.device is not None
        backups = self.repo.backups(node.device)
        out = [(b.id.encode(), self.inodes.get(FILES_BACKUP, node.device, b.id)) for b in backups]
        if backups:
            out.append((b"latest", self.inodes.get(FILES_LATEST, node.device)))
        return out

    def _files_child(self, parent: Node, name: bytes) -> Node | None:
        return self.tree.backup_child(parent, name, FILES_BACKUP, FILES_LATEST)

    def _describe_files_dir(self, node: Node, a: Attributes) -> None:
        a.mode = stat.S_IFDIR | 0o755
        a.nlink = 2
        a.entry_timeout = BACKUP_TIMEOUT  # the name; its listing follows the catalog

    def _latest_exists(self, node: Node) -> bool:
        return self.repo.latest_backup(node.device or "") is not None

    # -- files/<id>/ ---------------------------------------------------------------------------

    def _record(self, node: Node) -> BackupRecord:
        rec = self.repo.backup_record(node.backup or "")
        if rec is None or rec.device != node.device:
            raise RequestError(errno.ENOENT)
        return rec

    @contextmanager
    def _disk(self, node: Node) -> Iterator[GuestDisk]:
        """The node's backup's disk: the open one when there is (no catalog
        query: a listing's entries are described one by one), else opened."""
        with self.disks.using_open(node.backup or "") as open_disk:
            if open_disk is not None:
                yield open_disk
                return
        with self.disks.using(self._record(node)) as disk:
            yield disk

    @contextmanager
    def _volume(self, node: Node) -> Iterator[Volume]:
        with self._disk(node) as disk:
            try:
                yield disk.volume(node.volume or "")
            except FileNotFoundError:
                raise RequestError(errno.ENOENT) from None

    def _backup_exists(self, node: Node) -> bool:
        rec = self.repo.backup_record(node.backup or "")
        return rec is not None and rec.device == node.device

    def _backup_entries(self, node: Node) -> Listing:
        with self._disk(node) as disk:
            names = disk.readable()
            out: Listing = [(b"volumes", self.inodes.get(VOLUMES, node.device, node.backup))]
            for name in names:
                volume = disk.volume(name)
                out.append((name.encode(), self._guest_node(node, name, (), volume.entry(()))))
        return out

    def _backup_child(self, parent: Node, name: bytes) -> Node | None:
        if name == b"volumes":
            return self.inodes.get(VOLUMES, parent.device, parent.backup)
        with self._disk(parent) as disk:
            text = name.decode("utf-8", "replace")
            if text not in disk.readable():
                return None
            return self._guest_node(parent, text, (), disk.volume(text).entry(()))

    def _describe_backup_dir(self, node: Node, a: Attributes) -> None:
        rec = self._record(node)
        # With files_owner_only the kernel must refuse others too: it keeps
        # guest names and attributes for an hour, and a path walk through
        # what the owner already walked never reaches fs.py's checks.
        a.mode = stat.S_IFDIR | (0o500 if self.owner_only else 0o555)
        a.nlink = 2
        a.mtime_ns = rec.created_ns
        a.entry_timeout = a.attr_timeout = BACKUP_TIMEOUT

    def _volumes_text(self, node: Node) -> bytes:
        with self._disk(node) as disk:
            return disk.volumes_text().encode()

    def _describe_volumes(self, node: Node, a: Attributes) -> None:
        a.mode = stat.S_IFREG | 0o444
        a.size = len(self._volumes_text(node))
        a.mtime_ns = self._record(node).created_ns
        a.entry_timeout = a.attr_timeout = BACKUP_TIMEOUT

    # -- the guest's own files --------------------------------------------------------------------

    def _guest_node(self, parent: Node, volume: str, path: tuple[bytes, ...], entry: GuestEntry) -> Node:
        key = (GUEST, parent.device, parent.backup, volume, entry.key)
        return self.inodes.get_forgettable(
            key, lambda inode: Node(inode, GUEST, parent.device, parent.backup, volume, path))

    def _guest_entries(self, node: Node) -> Listing:
        with self._volume(node) as volume:
            listing = self._listing(volume, node.path)
            return [(name, self._guest_node(node, node.volume or "", node.path + (name,), entry))
                    for name, entry in sorted(listing.items())]

    @staticmethod
    def _listing(volume: Volume, path: tuple[bytes, ...]) -> dict[bytes, GuestEntry]:
        try:
            return volume.listing(path)
        except FileNotFoundError:
            raise RequestError(errno.ENOENT) from None
        except NotADirectoryError:
            raise RequestError(errno.ENOTDIR) from None

    def _guest_child(self, parent: Node, name: bytes) -> Node | None:
        with self._volume(parent) as volume:
            entry = self._listing(volume, parent.path).get(name)
            if entry is None:
                return None
            return self._guest_node(parent, parent.volume or "", parent.path + (name,), entry)

    def _guest_parent(self, node: Node) -> Node:
        if not node.path:
            return self.inodes.get(FILES_BACKUP, node.device, node.backup)
        with self._volume(node) as volume:
            up = node.path[:-1]
            return self._guest_node(node, node.volume or "", up, self._entry(volume, up))

    @staticmethod
    def _entry(volume: Volume, path: tuple[bytes, ...]) -> GuestEntry:
        try:
            return volume.entry(path)
        except (FileNotFoundError, NotADirectoryError):
            raise RequestError(errno.ENOENT) from None

    def entry(self, node: Node) -> GuestEntry:
        """A guest node's entry (blocks)."""
        with self._volume(node) as volume:
            return self._entry(volume, node.path)

    def _describe_guest(self, node: Node, a: Attributes) -> None:
        self._fill_guest(a, self.entry(node))

    def described_children(self, node: Node) -> list[tuple[bytes, Node, Attributes]]:
        """A guest directory's entries with their attributes, from one listing (blocks).

        Describing each child on its own asks for its directory's listing
        again; a directory beyond the volume's listing cache (200,000
        entries) would be parsed once per entry: hours at 100% CPU for an
        `ls` that cannot be interrupted.
        """
        with self._volume(node) as volume:
            listing = self._listing(volume, node.path)
            out = []
            for name, entry in sorted(listing.items()):
                child = self._guest_node(node, node.volume or "", node.path + (name,), entry)
                a = Attributes(child.inode)
                self._fill_guest(a, entry)
                out.append((name, child, a))
            return out

    @staticmethod
    def _fill_guest(a: Attributes, e: GuestEntry) -> None:
        a.mode = e.mode
        a.size = e.size
        a.blocks = e.blocks
        a.nlink = max(1, e.nlink)
        a.uid, a.gid = e.uid, e.gid
        a.atime_ns, a.mtime_ns, a.ctime_ns = e.atime_ns, e.mtime_ns, e.ctime_ns
        a.rdev = e.rdev
        a.blksize = BIG_BLKSIZE if e.is_file else 4096
        a.entry_timeout = a.attr_timeout = BACKUP_TIMEOUT  # a backup never changes

    def _guest_target(self, node: Node) -> bytes:
        with self._volume(node) as volume:
            if not self._entry(volume, node.path).is_link:
                raise RequestError(errno.EINVAL)
            return volume.readlink(node.path)

    def _guest_xattrs(self, node: Node) -> dict[bytes, bytes]:
        with self._volume(node) as volume:
            return volume.xattrs(node.path)

    # -- reading a file -----------------------------------------------------------------------------

    def open_file(self, node: Node) -> tuple[GuestDisk, BackupRecord, Volume, object]:
        """Hold the backup's disk for an open file: (disk, record, volume, its data).
        The caller releases the disk with ``close_file``."""
        rec = self._record(node)
        disk = self.disks.acquire(rec)
        try:
            try:
                volume = disk.volume(node.volume or "")
            except FileNotFoundError:
                raise RequestError(errno.ENOENT) from None
            entry = self._entry(volume, node.path)
            if stat.S_ISDIR(entry.mode):
                raise RequestError(errno.EISDIR)
            if not entry.is_file:
                raise RequestError(errno.EACCES)  # device nodes, FIFOs, sockets: listed, not opened
            return disk, rec, volume, volume.data(node.path)
        except BaseException:
            self.disks.release(rec.id, disk)
            raise

    def close_file(self, rec: BackupRecord, disk: GuestDisk) -> None:
        self.disks.release(rec.id, disk)
