"""The mounted tree as a model (backupfs/tree.py), built on a real repository with no mount.

What a mount shows - names, attributes, link targets, extended attributes
and texts - is checked here against the catalog it comes from, without
pyfuse3 or a kernel in the way: a wrong name or size fails here, not only
through a mount.
"""

from __future__ import annotations

import errno
import random
import stat
from pathlib import Path

import pytest

from backupfs.tree import (
    BACKUP, BACKUPS, BIG_BLKSIZE, BITMAP, CHAIN, DEVDIR, DEVICE, LATEST, ROOT, ROOT_INODE, SNAPSHOT, Node,
    RequestError, Tree,
)
from engine.repo import Repository
from tests.jobstatuses import Statuses
from tests.oracle import qemu_img, qemu_io

KiB, MiB = 1024, 1024 * 1024



@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "vm1.img"
    src.write_bytes(random.Random(5).randbytes(2 * MiB))
    return src


def _tree(repo: Repository, statuses: Statuses | None = None, started_ns: int = 1_234_567_890) -> Tree:
    return Tree(repo, statuses or Statuses(), started_ns)


def _names(tree: Tree, node: Node) -> list[bytes]:
    return [name for name, _ in tree.children(node)]


def _refused(err: int, fn: object, *args: object) -> None:
    with pytest.raises(RequestError) as caught:
        fn(*args)  # type: ignore[operator]
    assert caught.value.errno == err


def test_the_layout_of_a_device_with_backups(repo: Repository, source: Path, tmp_path: Path) -> None:
    repo.add_device("vm1", str(source), 64 * KiB)
    (tmp_path / "vm2.img").write_bytes(bytes(MiB))
    repo.add_device("vm2", str(tmp_path / "vm2.img"), 64 * KiB)
    ids = [repo.backup("vm1", kind, allow_empty=True).record.id for kind in ("full", "incremental")]
    tree = _tree(repo)
    root = tree.root()
    assert root.inode == ROOT_INODE and root.kind == ROOT
    assert _names(tree, root) == [b"vm1", b"vm2"]
    devdir = tree.child(root, b"vm1")
    assert (devdir.kind, devdir.device) == (DEVDIR, "vm1")
    assert _names(tree, devdir) == [b"device", b"snapshot", b"chain", b"bitmap", b"backups"]
    backups = tree.child(devdir, b"backups")
    assert _names(tree, backups) == [i.encode() for i in ids] + [b"latest"]
    # vm2 has no backups: no "latest" to point nowhere.
    assert _names(tree, tree.child(tree.child(root, b"vm2"), b"backups")) == []

    # `.` and `..`, and every listed name found again by lookup as the same node.
    assert tree.child(backups, b".") is backups and tree.child(backups, b"..") == devdir
    assert tree.child(devdir, b"..") == root and tree.child(root, b"..") == root
    for parent in (root, devdir, backups):
        for name, node in tree.children(parent):
            assert tree.child(parent, name) == node
            assert tree.parent(node) == parent


def test_names_that_are_not_there(repo: Repository, source: Path, tmp_path: Path) -> None:
    repo.add_device("vm1", str(source), 64 * KiB)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    repo.add_device("other", str(other), 64 * KiB)
    mine = repo.backup("vm1", "full").record.id
    theirs = repo.backup("other", "full").record.id
    tree = _tree(repo)
    backups = tree.inodes.get(BACKUPS, "vm1")
    assert tree.child(backups, mine.encode()).backup == mine
    for bad in (b"nope", b"\xff", mine.encode() + b"x", theirs.encode()):
        _refused(errno.ENOENT, tree.child, backups, bad)
    _refused(errno.ENOENT, tree.child, tree.root(), b"vm3")
    _refused(errno.ENOENT, tree.child, tree.inodes.get(DEVDIR, "vm1"), b"files")
    _refused(errno.ENOTDIR, tree.children, tree.inodes.get(CHAIN, "vm1"))
    _refused(errno.ENOTDIR, tree.child, tree.inodes.get(BACKUP, "vm1", mine), b"x")
    _refused(errno.ENOENT, tree.inodes.node, 10_000)
    assert tree.inodes.find(10_000) is None


def test_inode_numbers_are_stable_and_distinct(repo: Repository, source: Path) -> None:
    repo.add_device("vm1", str(source), 64 * KiB)
    bid = repo.backup("vm1", "full").record.id
    tree = _tree(repo)
    nodes = [tree.inodes.get(kind, "vm1") for kind in (DEVDIR, DEVICE, SNAPSHOT, CHAIN, BITMAP, BACKUPS, LATEST)]
    nodes.append(tree.inodes.get(BACKUP, "vm1", bid))
    assert len({n.inode for n in nodes} | {ROOT_INODE}) == len(nodes) + 1
    for n in nodes:
        assert tree.inodes.get(n.kind, n.device, n.backup) is n
        assert tree.inodes.node(n.inode) is n


def test_attributes_come_from_the_catalog(repo: Repository, source: Path) -> None:
    repo.add_device("vm1", str(source), 64 * KiB)
    rec = repo.backup("vm1", "full", label="before upgrade").record
    tree = _tree(repo, started_ns=42)

    for kind in (ROOT, DEVDIR, BACKUPS):
        a = tree.attributes(tree.inodes.get(kind, None if kind == ROOT else "vm1"))
        assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o755 and a.nlink == 2
        assert a.entry_timeout > 0 and a.attr_timeout > 0 and a.mtime_ns == 42

    dev = tree.attributes(tree.inodes.get(DEVICE, "vm1"))
    assert stat.S_ISREG(dev.mode) and stat.S_IMODE(dev.mode) == 0o600
    assert dev.size == 2 * MiB and dev.blocks == 2 * MiB // 512 and dev.blksize == BIG_BLKSIZE
    assert dev.mtime_ns == source.stat().st_mtime_ns
    assert dev.entry_timeout > 0 and dev.attr_timeout == 0  # written to: its times change

    backup = tree.attributes(tree.inodes.get(BACKUP, "vm1", rec.id))
    assert stat.S_ISREG(backup.mode) and stat.S_IMODE(backup.mode) == 0o440
    assert backup.size == rec.size == 2 * MiB
    assert backup.blocks == (rec.stored_bytes + 511) // 512 and rec.stored_bytes > 0
    assert backup.mtime_ns == rec.created_ns and backup.attr_timeout > 0

    latest = tree.inodes.get(LATEST, "vm1")
    link = tree.attributes(latest)
    assert stat.S_ISLNK(link.mode) and link.size == len(rec.id) and link.entry_timeout == 0
    assert tree.link_target(latest) == rec.id.encode()
    _refused(errno.EINVAL, tree.link_target, tree.inodes.get(CHAIN, "vm1"))

    for kind, mode in ((SNAPSHOT, 0o600), (CHAIN, 0o444), (BITMAP, 0o444)):
        node = tree.inodes.get(kind, "vm1")
        a = tree.attributes(node)
        assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == mode, kind
        assert a.size == len(tree.text(node)) > 0, kind


def test_texts_and_extended_attributes(repo: Repository, source: Path) -> None:
    repo.add_device("vm1", str(source), 64 * KiB)
    full = repo.backup("vm1", "full").record
    inc = repo.backup("vm1", "incremental", label="nightly", allow_empty=True).record
    statuses = Statuses()
    tree = _tree(repo, statuses)

    snapshot = tree.inodes.get(SNAPSHOT, "vm1")
    assert tree.text(snapshot).startswith(b"state: idle\n")
    statuses("vm1").begin("full")
    assert tree.text(snapshot).startswith(b"state: running\ncommand: full\n")
    assert tree.attributes(snapshot).size == len(tree.text(snapshot))

    chain = tree.text(tree.inodes.get(CHAIN, "vm1")).decode().splitlines()
    assert [line.split()[:3] for line in chain[1:]] == [[full.id, "full", "-"], [inc.id, "incremental", full.id]]
    assert chain[2].split()[-1] == "nightly"
    assert tree.text(tree.inodes.get(BITMAP, "vm1")).startswith(b"granularity: 65536\n")

    xattrs = tree.xattrs(tree.inodes.get(BACKUP, "vm1", inc.id))
    assert xattrs[b"user.backupfs.kind"] == b"incremental"
    assert xattrs[b"user.backupfs.parent"] == full.id.encode()
    assert xattrs[b"user.backupfs.label"] == b"nightly"
    assert xattrs[b"user.backupfs.stored_bytes"] == str(inc.stored_bytes).encode()
    assert xattrs[b"user.backupfs.image"] == inc.image.encode()
    assert b"user.backupfs.label" not in tree.xattrs(tree.inodes.get(BACKUP, "vm1", full.id))
    assert tree.xattrs(tree.inodes.get(CHAIN, "vm1")) == {}


def test_pruned_backups_are_gone_from_the_model(repo: Repository, source: Path) -> None:
    repo.add_device("vm1", str(source), 64 * KiB)
    first, second = (repo.backup("vm1", "full").record for _ in range(2))
    tree = _tree(repo)
    gone = tree.inodes.get(BACKUP, "vm1", first.id)
    latest = tree.inodes.get(LATEST, "vm1")
    assert tree.exists(gone) and tree.exists(latest)

    repo.prune("vm1", remove=first.id)
    assert not tree.exists(gone)
    _refused(errno.ENOENT, tree.attributes, gone)
    _refused(errno.ENOENT, tree.xattrs, gone)
    assert _names(tree, tree.inodes.get(BACKUPS, "vm1")) == [second.id.encode(), b"latest"]

    repo.prune("vm1", remove=second.id)
    assert not tree.exists(latest)
    _refused(errno.ENOENT, tree.attributes, latest)
    _refused(errno.ENOENT, tree.link_target, latest)
    _refused(errno.ENOENT, tree.child, tree.inodes.get(BACKUPS, "vm1"), b"latest")
    assert not tree.exists(tree.inodes.get(DEVDIR, "nope"))


def test_an_imported_archive_has_no_live_device(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "archive.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "4M")
    qemu_io(image, "write -P 0x5a 0 64k")
    (rec,) = repo.import_chain("old", str(image))
    tree = _tree(repo)
    devdir = tree.child(tree.root(), b"old")
    assert _names(tree, devdir) == [b"snapshot", b"chain", b"backups"]
    _refused(errno.ENOENT, tree.child, devdir, b"device")
    assert tree.attributes(tree.child(tree.child(devdir, b"backups"), rec.id.encode())).size == 4 * MiB


def test_the_model_needs_neither_fuse_nor_trio() -> None:
    """The tree is a library: a new view of it (or a tool) can use it with
    no mount and no event loop."""
    import subprocess
    import sys

    code = "import sys, backupfs.tree; print(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
