"""The files view as a tree model (backupfs/filestree.py), with a real repository and no mount.

Laziness and bounds are checked here, where they can be seen: listing
``files/`` opens no backup, a guest node goes when the kernel forgets it,
and open guest disks are shared, kept a while and closed only when unused.
"""

from __future__ import annotations

from pathlib import Path

from backupfs.filescache import FilesCache
from backupfs.filestree import FILES, FILES_BACKUP, GUEST, FilesView
from backupfs.tree import DEVDIR, Node, Tree
from backupfs.views import ViewCache
from engine.repo import Repository
from tests.guestfs import make_fs
from tests.guesttree import default_tree
from tests.jobstatuses import Statuses


def _view(repo: Repository, keep: int = 4) -> tuple[Tree, FilesView]:
    tree = Tree(repo, Statuses(), 1_234_567_890)
    return tree, FilesView(tree, FilesCache(ViewCache(repo), keep=keep))


def _ext4_device(repo: Repository, tmp_path: Path, backups: int = 1) -> list[str]:
    image = make_fs("ext4", tmp_path, default_tree())
    repo.add_device("vm", str(image))
    return [repo.backup("vm", "full" if i == 0 else "incremental", allow_empty=True).record.id for i in range(backups)]


def test_listing_files_of_many_backups_opens_none(repo: Repository, tmp_path: Path) -> None:
    """`ls -l files/` costs what `ls -l backups/` costs: the catalog, no parsing."""
    ids = _ext4_device(repo, tmp_path, backups=30)
    tree, view = _view(repo)
    files = tree.child(tree.inodes.get(DEVDIR, "vm"), b"files")
    assert files.kind == FILES
    listing = tree.children(files)
    assert [n for n, _ in listing] == [i.encode() for i in ids] + [b"latest"]
    for _, node in listing:
        tree.attributes(node)
    assert view.disks.open_ids() == []
    assert tree.link_target(tree.child(files, b"latest")) == ids[-1].encode()


def test_a_guest_node_goes_when_the_kernel_forgets_it(repo: Repository, tmp_path: Path) -> None:
    _ext4_device(repo, tmp_path)
    tree, view = _view(repo)
    backup = tree.child(tree.child(tree.inodes.get(DEVDIR, "vm"), b"files"), b"latest")
    backup = tree.inodes.get(FILES_BACKUP, "vm", tree.link_target(backup).decode())
    root = tree.child(backup, b"disk")
    etc = tree.child(root, b"etc")
    hostname = tree.child(etc, b"hostname")
    assert hostname.kind == GUEST and hostname.path == (b"etc", b"hostname")
    assert tree.child(etc, b"hostname") is hostname  # one node per guest inode
    held = tree.inodes.held()
    tree.inodes.looked_up(hostname)
    tree.inodes.looked_up(hostname)
    tree.inodes.forget(hostname.inode, 1)
    assert tree.inodes.find(hostname.inode) is hostname
    tree.inodes.forget(hostname.inode, 1)
    assert tree.inodes.find(hostname.inode) is None
    assert tree.inodes.held() == held - 1
    again = tree.child(etc, b"hostname")
    assert again.inode != hostname.inode and tree.attributes(again).size == len(b"guest\n")
    # Nodes listed but never handed to the kernel are dropped with the listing.
    children = [node for _, node in tree.children(etc)]
    tree.inodes.drop_unheld(children)
    assert all(tree.inodes.find(n.inode) is None for n in children)


def test_hard_links_are_one_node(repo: Repository, tmp_path: Path) -> None:
    _ext4_device(repo, tmp_path)
    tree, view = _view(repo)
    ident = repo.latest_backup("vm")
    assert ident is not None
    alice = tree.inodes.get(FILES_BACKUP, "vm", ident.id)
    for name in (b"disk", b"home", b"alice"):
        alice = tree.child(alice, name)
    notes, link = tree.child(alice, b"notes.txt"), tree.child(alice, b"notes-link.txt")
    assert notes is link
    assert tree.attributes(notes).nlink == 2


def test_open_disks_are_shared_kept_and_closed_only_when_unused(repo: Repository, tmp_path: Path) -> None:
    ids = _ext4_device(repo, tmp_path, backups=3)
    tree, view = _view(repo, keep=1)
    cache = view.disks
    recs = [repo.backup_record(i) for i in ids]
    assert all(recs)
    first = cache.acquire(recs[0])  # type: ignore[arg-type]
    assert cache.acquire(recs[0]) is first  # type: ignore[arg-type]
    second = cache.acquire(recs[1])  # type: ignore[arg-type]
    assert cache.open_ids() == [ids[0], ids[1]]  # both in use: neither closed, whatever `keep` says
    first.volume("disk").listing(())
    cache.release(ids[0], first)
    cache.release(ids[0], first)
    cache.release(ids[1], second)
    third = cache.acquire(recs[2])  # type: ignore[arg-type]
    assert cache.open_ids() == [ids[2]]  # the idle ones beyond keep=1 are closed
    cache.drop_all()
    assert cache.open_ids() == [ids[2]]  # in use: closed when its last use ends
    third.volume("disk")
    cache.release(ids[2], third)
    assert cache.open_ids() == []
    assert view.disks.views.in_use() == []


def test_a_guest_nodes_parent_is_its_directory(repo: Repository, tmp_path: Path) -> None:
    _ext4_device(repo, tmp_path)
    tree, view = _view(repo)
    rec = repo.latest_backup("vm")
    assert rec is not None
    backup = tree.inodes.get(FILES_BACKUP, "vm", rec.id)
    root = tree.child(backup, b"disk")
    bin_dir = tree.child(tree.child(root, b"usr"), b"bin")
    assert tree.child(bin_dir, b"..").path == (b"usr",)
    assert tree.parent(root) == backup
    assert tree.link_target(tree.child(bin_dir, b"absolute-link")) == b"/etc/hostname"
    assert isinstance(tree.child(backup, b"volumes"), Node)
