"""Hostile cases for history (SPEC §9) that the oracle tests did not cover.

``CASES``: a guest's change through a kernel mount of the source, then an
incremental, checked the way tests/test_history_oracle.py checks (exact
lines, rsync between kernel mounts of the two backups, ext's fast path
equal to the whole-tree comparison), on ext4 and XFS: truncated and
re-extended files, punched holes, zeroed ranges (unwritten extents at the
same place), an xattr on a directory, a rename over a file with identical
bytes and times, a new subtree inside a changed directory, names with tabs,
control bytes and non-UTF-8 bytes. Then: a change in a second partition
only, a partition removed; versions/ of paths that change type, hostile
lookups, writes, a version file open across the prune of its backup; and
the bounds: the diff cache by lines held, ext's hand-over to the tree walk
when most inodes changed, a lookup of a name that is no volume, two readers
of one pair at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_history_oracle import Case, lines, run_case, shown

pytestmark = pytest.mark.mount

BIG = ("usr", "bin", "big.bin")


def _keep_mtime(path: Path, change: Callable[[], object]) -> None:
    """``change``, then the file's mtime as it was: rsync's quick check is blind to it."""
    st = os.stat(path)
    change()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate_reextend(root: Path) -> None:
    p = root.joinpath(*BIG)
    size = p.stat().st_size
    _keep_mtime(p, lambda: (os.truncate(p, 0), os.truncate(p, size)))


def punch_hole(root: Path) -> None:
    p = root.joinpath(*BIG)
    _keep_mtime(p, lambda: subprocess.run(["fallocate", "--punch-hole", "-o", "1M", "-l", "64K", str(p)],
                                          check=True))


def zero_range(root: Path) -> None:
    p = root.joinpath(*BIG)
    _keep_mtime(p, lambda: subprocess.run(["fallocate", "--zero-range", "-o", "2M", "-l", "64K", str(p)],
                                          check=True))


def directory_xattr(root: Path) -> None:
    os.setxattr(root / "usr", "user.dirtag", b"v")


def rename_over_identical(root: Path) -> None:
    shutil.copy2(root / "etc" / "hostname", root / "etc" / ".hostname.tmp")
    os.chown(root / "etc" / ".hostname.tmp", 0, 0)
    os.replace(root / "etc" / ".hostname.tmp", root / "etc" / "hostname")


def nested_new_tree(root: Path) -> None:
    (root / "home" / "alice" / "sub" / "deeper").mkdir(parents=True)
    (root / "home" / "alice" / "sub" / "deeper" / "f").write_bytes(b"f")
    (root / "home" / "alice" / "notes.txt").write_bytes(b"changed\n")


def hostile_names(root: Path) -> None:
    etc = os.fsencode(root / "etc")
    for name in (b"tab\tname", b"\xff\xfe-latin", b"ctl\x01\x7f", b"back\\slash"):
        with open(etc + b"/" + name, "wb") as f:
            f.write(b"x")


CASES = {
    "truncate_reextend": Case(truncate_reextend, lines("M usr/bin/big.bin"), blind=lines("M usr/bin/big.bin")),
    "punch_hole": Case(punch_hole, lines("M usr/bin/big.bin"), blind=lines("M usr/bin/big.bin")),
    "zero_range": Case(zero_range, lines("M usr/bin/big.bin"), blind=lines("M usr/bin/big.bin")),
    "directory_xattr": Case(directory_xattr, lines("m usr"), blind=lines("m usr")),
    "rename_over_identical": Case(rename_over_identical, lines("m etc")),
    "nested_new_tree": Case(nested_new_tree, lines(
        "m home/alice", "A home/alice/sub", "A home/alice/sub/deeper", "A home/alice/sub/deeper/f",
        "M home/alice/notes.txt", "M home/alice/notes-link.txt")),
    "hostile_names": Case(hostile_names, {("m", shown(b"etc"))} | {
        ("A", shown(b"etc/" + n)) for n in (b"tab\tname", b"\xff\xfe-latin", b"ctl\x01\x7f", b"back\\slash")}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ext4_hostile(tmp_path: Path, name: str) -> None:
    run_case(tmp_path, "ext4", CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_xfs_hostile(tmp_path: Path, name: str) -> None:
    run_case(tmp_path, "xfs", CASES[name])


def test_second_partition_and_a_volume_that_comes_and_goes(tmp_path: Path) -> None:
    """A change in p2 alone names only p2; a partition added is all A, one removed all D."""
    from engine.history.history import History
    from engine.repo import Repository
    from tests.guestdisks import Part, gpt_disk
    from tests.guestfs import mounted
    from tests.test_history_oracle import as_lines

    disk = gpt_disk(tmp_path, [Part(32 * 1024 * 1024, "ext4"), Part(32 * 1024 * 1024, "ext4")])
    p1, p2 = disk.volumes
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("vm", str(disk.image))
        repo.backup("vm", "full")
        with mounted(disk.image, "ext4", p2.offset, p2.size) as root:
            (root / "etc" / "hostname").write_bytes(b"p2 only\n")
        inc = repo.backup("vm", "incremental", scan=True).record
        assert as_lines(History(repo).changes(inc)) == {("M", "p2/etc/hostname")}
        subprocess.run(["sgdisk", "-d", "1", str(disk.image)], check=True, capture_output=True)
        gone = repo.backup("vm", "incremental", scan=True).record
        found = as_lines(History(repo).changes(gone))
        assert found and {op for op, _ in found} == {"D"} and all(p.startswith("p1/") for _, p in found), found
        assert ("D", "p1/") in found and ("D", "p1/etc/hostname") in found
        back = repo.backup("vm", "incremental", scan=True, allow_empty=True)  # nothing changed: nothing to say
        assert History(repo).changes(back.record) == []
    finally:
        repo.close()


def test_the_cache_of_diffs_is_bounded_by_lines_not_only_by_pairs(tmp_path: Path) -> None:
    """32 pairs of a whole-volume rewrite each were all kept (15 MB a 100,000 lines): the
    cache must hold at most its budget of lines, keeping the newest result whatever its size."""
    from engine.history.history import History
    from engine.repo import Repository
    from tests.guestfs import make_fs, mounted
    from tests.guesttree import default_tree

    image = make_fs("ext4", tmp_path, default_tree())
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("vm", str(image))
        recs = [repo.backup("vm", "full").record]
        for k in range(4):
            with mounted(image, "ext4") as root:
                for n in range(k + 2):
                    (root / "etc" / f"added-{k}-{n}").write_bytes(b"x")
            recs.append(repo.backup("vm", "incremental", scan=True).record)
        history = History(repo, cached_changes=8)
        sizes = [len(history.changes(rec)) for rec in recs[1:]]
        assert sizes == [3, 4, 5, 6]  # the names added, and etc itself
        assert history.held() == 6  # only the newest: 5 + 6 is over the budget
        newest = history.changes(recs[-1])
        assert history.changes(recs[-1]) is newest  # the newest is served from the cache
        first = history.changes(recs[1])
        assert history.held() == 3  # 6 + 3 is over the budget: the older result went
        assert history.changes(recs[1]) is first
    finally:
        repo.close()


def test_versions_of_paths_that_change_type_and_hostile_lookups(tmp_path: Path) -> None:
    """versions/ through a real mount: a file that became a directory and a file again, a
    symlink that became a file, names that are not there (``latest``, an id, a newline,
    255 bytes), writes refused, and a version file kept open across the prune that
    removed the backup it was read from."""
    import errno

    from tests.commands import cli, sh
    from tests.guestfs import make_fs
    from tests.guesttree import default_tree
    from tests.mounts import Mounted
    from tests.test_history_faces import _refused, guest_of

    image = make_fs("ext4", tmp_path, default_tree())
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", image)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    held = None
    try:
        vm = m.path("vm")

        def backup(kind: str) -> str:
            sh(f"echo {kind} > {vm / 'snapshot'}")
            return os.readlink(vm / "backups" / "latest")

        b0 = backup("full")
        with guest_of(vm / "device") as g:
            os.unlink(g / "etc" / "hostname")
            (g / "etc" / "hostname").mkdir()
            (g / "etc" / "hostname" / "inside").write_bytes(b"inside\n")
            os.unlink(g / "usr" / "bin" / "relative-link")
            (g / "usr" / "bin" / "relative-link").write_bytes(b"a file now\n")
        b1 = backup("incremental")
        with guest_of(vm / "device") as g:
            (g / "etc" / "hostname" / "inside").unlink()
            (g / "etc" / "hostname").rmdir()
            (g / "etc" / "hostname").write_bytes(b"back\n")
        b2 = backup("incremental")

        hostname = vm / "versions" / "disk" / "etc" / "hostname"
        assert sorted(os.listdir(hostname)) == [b0, b2]  # a run broken by the directory
        assert (hostname / b0).read_bytes() == b"guest\n" and (hostname / b2).read_bytes() == b"back\n"
        link = vm / "versions" / "disk" / "usr" / "bin" / "relative-link"
        assert os.listdir(link) == [b1]
        _refused(errno.ENOENT, os.stat, vm / "versions" / "disk" / "usr" / "bin" / "absolute-link")
        for name in ("latest", b1, "...", "a\nb", "x" * 255, b0[:-1]):
            _refused(errno.ENOENT, os.stat, hostname / name)
        _refused(errno.ENOENT, os.stat, vm / "versions" / "no-such-volume")
        _refused(errno.ENOENT, os.stat, vm / "changes" / "latest-but-not")
        _refused(errno.EROFS, os.open, hostname / "new", os.O_CREAT | os.O_WRONLY)
        _refused(errno.EROFS, os.mkdir, vm / "versions" / "disk" / "new")
        _refused(errno.EROFS, os.rename, hostname / b0, hostname / "renamed")

        held = open(link / b1, "rb")
        assert held.read(4) == b"a fi"
        sh(f"echo 'prune remove={b1}' > {vm / 'snapshot'}")
        try:
            rest = held.read()
        except OSError as e:  # gone with its backup: an error is honest, other bytes are not
            assert e.errno in (errno.EIO, errno.ENOENT, errno.ESTALE), e
        else:
            assert rest == b"le now\n"
        assert os.listdir(link) == [b2]  # the first backup holding it now
        assert (link / b2).read_bytes() == b"a file now\n"
        assert sorted(os.listdir(vm / "changes")) == [b0, b2]
        held.close()
        held = None
        m.stop()
    finally:
        if held is not None:
            held.close()
        m.cleanup()


def test_ext_hands_over_to_the_tree_walk_when_most_inodes_changed(tmp_path: Path) -> None:
    """Every inode changed (a chmod of everything): naming each through both path indexes
    cost 1.2-1.4 times the time and 1.1-1.6 times the memory of walking both trees (100,000
    files), so the fast path says None and the walk gives the lines."""
    from contextlib import ExitStack

    from engine.history.blocks import clip
    from engine.history.changes import diff_disks
    from engine.history.extdiff import ext_changes
    from engine.history.history import History
    from engine.repo import Repository
    from tests.guestfs import make_fs, mounted
    from tests.guesttree import default_tree
    from tests.test_history_oracle import as_lines

    image = make_fs("ext4", tmp_path, default_tree())
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("vm", str(image))
        full = repo.backup("vm", "full").record
        touched = set()
        with mounted(image, "ext4") as root:
            for where, dirs, files in os.walk(root):
                for name in dirs + files:
                    p = Path(where) / name
                    if not p.is_symlink():
                        os.chmod(p, 0o711)
                        touched.add(("m", shown(os.fsencode(p.relative_to(root)))))
        inc = repo.backup("vm", "incremental", scan=True).record
        ranges = History(repo).blocks(full, inc)
        with ExitStack() as stack:
            a = stack.enter_context(repo.open_files(full.id))
            b = stack.enter_context(repo.open_files(inc.id))
            info = {i.name: i for i in b.infos()}["disk"]
            assert ext_changes("disk", a.volume("disk"), b.volume("disk"), clip(ranges, info.offset, info.size)) is None
            found = as_lines(diff_disks(a, b, ranges))
        assert touched <= found and {op for op, _ in found} == {"m"}, (sorted(touched - found), sorted(found - touched))
    finally:
        repo.close()


def test_a_name_that_is_no_volume_is_looked_for_in_every_backup_once(tmp_path: Path) -> None:
    """``versions/.git`` (what a shell prompt asks of every parent directory) opened every
    backup on every lookup: 1.4 s with 200 backups, each time. After the first miss only
    the newest backup is looked into; a volume of an older backup alone still resolves."""
    from backupfs.filescache import FilesCache
    from backupfs.historytree import HistoryView
    from backupfs.tree import DEVDIR, RequestError, Tree
    from backupfs.views import ViewCache
    from engine.history.history import History
    from engine.repo import Repository
    from tests.guestfs import make_fs
    from tests.guesttree import default_tree
    from tests.jobstatuses import Statuses

    image = make_fs("ext4", tmp_path, default_tree())
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    disks = None
    try:
        repo.add_device("vm", str(image))
        ids = [repo.backup("vm", "full" if i == 0 else "incremental", allow_empty=True).record.id for i in range(12)]
        tree = Tree(repo, Statuses(), 1_234_567_890)
        disks = FilesCache(ViewCache(repo), keep=100)
        HistoryView(tree, disks, History(repo, open_disk=disks.using))
        versions = tree.child(tree.inodes.get(DEVDIR, "vm"), b"versions")
        for attempt in range(2):
            with pytest.raises(RequestError):
                tree.child(versions, b".git")
            opened = disks.open_ids()
            assert len(opened) == (12 if attempt == 0 else 1), opened
            disks.drop_all()
        assert tree.child(versions, b"disk").volume == "disk"
        assert disks.open_ids() == [ids[-1]]
    finally:
        if disks is not None:
            disks.drop_all()
        repo.close()


def test_two_readers_of_one_pair_at_once_compare_it_once(tmp_path: Path) -> None:
    """Two opens of one changes file at the same time both compared the pair (a
    whole-volume rewrite of 100,000 files: 14 s and 100 MB each); the second waits."""
    import threading
    from contextlib import contextmanager

    from engine.history.history import History
    from engine.repo import Repository
    from tests.guestfs import make_fs, mounted
    from tests.guesttree import default_tree

    image = make_fs("ext4", tmp_path, default_tree())
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("vm", str(image))
        repo.backup("vm", "full")
        with mounted(image, "ext4") as root:
            (root / "etc" / "hostname").write_bytes(b"changed\n")
        inc = repo.backup("vm", "incremental", scan=True).record
        opened: list[str] = []
        first_in, go = threading.Event(), threading.Event()

        @contextmanager
        def open_disk(rec):  # type: ignore[no-untyped-def]
            opened.append(rec.id)
            if len(opened) == 1:
                first_in.set()
                assert go.wait(60)
            with repo.open_files(rec.id) as disk:
                yield disk

        history = History(repo, open_disk=open_disk)
        results: list[object] = []
        readers = [threading.Thread(target=lambda: results.append(history.changes(inc))) for _ in range(2)]
        readers[0].start()
        assert first_in.wait(60)
        readers[1].start()
        readers[1].join(timeout=2)  # on its own, it would compare the pair meanwhile
        go.set()
        for r in readers:
            r.join(timeout=60)
        assert len(results) == 2 and results[0] is results[1]
        assert len(opened) == 2, opened  # one comparison: the two backups opened once each
    finally:
        repo.close()


def test_a_change_in_a_logical_volume(tmp_path: Path) -> None:
    """A logical volume's ranges are not mapped back to the disk: a file rewritten in one
    (FAT, changed with mtools) is found, its versions too, and nothing else is named."""
    from engine.history.history import History
    from engine.repo import Repository
    from tests.guestdisks import lvm_disk
    from tests.test_history_oracle import as_lines

    disk = lvm_disk(tmp_path)
    [lv] = [v for v in disk.volumes if v.name.startswith("lvm-") and len(v.segments) == 1]
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("vm", str(disk.image))
        full = repo.backup("vm", "full").record
        (tmp_path / "h").write_bytes(b"lv\n")
        subprocess.run(["mcopy", "-o", "-i", f"{disk.image}@@{lv.segments[0][0]}", str(tmp_path / "h"),
                        "::/etc/hostname"], check=True, capture_output=True)
        inc = repo.backup("vm", "incremental", scan=True).record
        history = History(repo)
        assert as_lines(history.changes(inc)) == {("M", f"{lv.name}/etc/hostname")}
        assert [v.backup for v in history.versions("vm", lv.name, (b"etc", b"hostname"))] == [full.id, inc.id]
        assert [v.backup for v in history.versions("vm", "p1", (b"etc", b"hostname"))] == [full.id]
    finally:
        repo.close()
