"""The faces of history: MOUNT/<device>/changes/<id>, MOUNT/<device>/versions/, `backupfs diff`.

An ext4 device is backed up five times; between backups it is changed as
a user changes a live disk: its filesystem loop-mounted from the mount's
own ``device`` file, files written, removed, re-moded, then unmounted. What
each face shows is checked against the changes the test made, and the
disk ranges of ``diff --blocks`` against the bytes of the two backups.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backupfs.filescache import FilesCache
from backupfs.historytree import CHANGES, CHANGES_FILE, HistoryView
from backupfs.tree import DEVDIR, Tree
from backupfs.views import ViewCache
from engine.history.history import History
from engine.repo import Repository
from tests.commands import cli, sh
from tests.jobstatuses import Statuses
from tests.guestfs import loop_device, make_fs, run
from tests.guesttree import default_tree
from tests.mounts import Mounted
from tests.users import OtherUser

PIECE = 64 * 1024
T1 = 1_700_000_001_111_111_111  # mtimes the test gives hostname's versions
T3 = 1_700_000_003_333_333_333


@contextmanager
def guest_of(device: Path) -> Iterator[Path]:
    """The device's ext4 filesystem, loop-mounted from the FUSE device file
    (noatime: reading leaves no trace); unmounted and detached after."""
    with loop_device(device) as loop, tempfile.TemporaryDirectory(prefix="guest-") as where:
        run("mount", "-t", "ext4", "-o", "noatime", loop, where)
        try:
            yield Path(where)
        finally:
            if subprocess.run(["umount", where], capture_output=True, timeout=120).returncode != 0:
                subprocess.run(["umount", "--lazy", where], capture_output=True, timeout=60)


def _rewrite(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _same_size_same_mtime(path: Path) -> None:
    """Bytes changed in place, size and mtime as they were."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"X" * 10)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _refused(err: int, fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as caught:
        fn(*args)
    assert caught.value.errno == err, caught.value


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode().splitlines()


def _differing_pieces(a: Path, b: Path) -> list[int]:
    """Offsets of the 64 KiB pieces where two equally long files differ."""
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(PIECE), fb.read(PIECE)
            if not x and not y:
                return out
            if x != y:
                out.append(offset)
            offset += PIECE


def _covered(ranges: list[tuple[int, int]], a: Path, b: Path, offset: int) -> bool:
    """Is every differing byte of the piece at ``offset`` inside a range?"""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(offset)
        fb.seek(offset)
        x, y = fa.read(PIECE), fb.read(PIECE)
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q and not any(s <= offset + i < e for s, e in ranges):
            return False
    return True


@pytest.mark.mount
@pytest.mark.long  # five backups, two mounts: 9-15 s
def test_changes_versions_and_diff_of_a_live_ext4_disk(tmp_path: Path) -> None:
    image = make_fs("ext4", tmp_path, default_tree())
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", image)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    m.start()
    try:
        vm = m.path("vm")
        device = vm / "device"
        original_mtime = None

        def backup(kind: str) -> str:
            sh(f"echo {kind} > {vm / 'snapshot'}")
            return os.readlink(vm / "backups" / "latest")

        ids = [backup("full")]
        with guest_of(device) as g:  # 1: hostname rewritten, a file added
            original_mtime = (g / "etc" / "hostname").stat().st_mtime_ns
            _rewrite(g / "etc" / "hostname", b"guest-two\n", T1)
            (g / "etc" / "new.conf").write_bytes(b"new\n")
        ids.append(backup("incremental"))
        with guest_of(device) as g:  # 2: big.bin's bytes, same size and mtime; a name not UTF-8
            _same_size_same_mtime(g / "usr" / "bin" / "big.bin")
            with open(os.fsencode(g / "usr" / "bin") + b"/caf\xe9", "wb") as f:
                f.write(b"latin-1\n")
        ids.append(backup("incremental"))
        with guest_of(device) as g:  # 3: hostname again, a file deleted
            _rewrite(g / "etc" / "hostname", b"guest-three\n", T3)
            os.unlink(g / "home" / "alice" / "with space.txt")
        ids.append(backup("incremental"))
        with guest_of(device) as g:  # 4: metadata only
            os.chmod(g / "etc" / "shadow", 0o600)
        ids.append(backup("incremental"))
        b0, b1, b2, b3, b4 = ids
        assert ids == sorted(ids) and len(set(ids)) == 5

        # -- changes/ ---------------------------------------------------------------------------
        changes = vm / "changes"
        assert sorted(os.listdir(changes)) == ids
        st = (changes / b1).stat()
        assert st.st_size == 0 and st.st_mode & 0o777 == 0o444  # size unknown until read: direct_io
        assert (changes / b0).read_bytes() == b""  # a full backup has no parent
        assert _lines(changes / b1) == ["m\tdisk/etc", "M\tdisk/etc/hostname", "A\tdisk/etc/new.conf"]
        assert _lines(changes / b2) == ["m\tdisk/usr/bin", "M\tdisk/usr/bin/big.bin",  # same size, mtime
                                        "A\tdisk/usr/bin/caf\\xe9"]
        assert _lines(changes / b3) == ["M\tdisk/etc/hostname", "m\tdisk/home/alice",
                                        "D\tdisk/home/alice/with space.txt"]
        assert _lines(changes / b4) == ["m\tdisk/etc/shadow"]
        text = (changes / b1).read_bytes()
        assert sh(f"cat {changes / b1}").stdout.encode() == text  # readers that trust st_size == 0 too
        assert sh(f"wc -c < {changes / b1}").stdout.strip() == str(len(text))
        assert sh(f"tail -n 1 {changes / b1}").stdout.encode() == text.splitlines(keepends=True)[-1]
        sh(f"cp {changes / b1} {tmp_path / 'copied'}")
        assert (tmp_path / "copied").read_bytes() == text

        # -- versions/ ---------------------------------------------------------------------------
        versions = vm / "versions"
        assert os.listdir(versions) == ["disk"]
        hostname = versions / "disk" / "etc" / "hostname"
        assert os.listdir(hostname) == [b0, b1, b3]  # changed in 3 of the 5 backups
        assert [(hostname / v).read_bytes() for v in (b0, b1, b3)] == [b"guest\n", b"guest-two\n", b"guest-three\n"]
        assert [(hostname / v).stat().st_mtime_ns for v in (b0, b1, b3)] == [original_mtime, T1, T3]
        assert (hostname / b3).stat().st_size == len(b"guest-three\n")
        assert (hostname / b0).stat().st_mode == 0o100644
        alice = versions / "disk" / "home" / "alice"
        assert "with space.txt" not in os.listdir(alice)  # not in the newest backup...
        deleted = alice / "with space.txt"
        assert os.listdir(deleted) == [b0]  # ...but reachable by name
        assert (deleted / b0).read_bytes() == b"a name with spaces\n"
        assert (deleted / b0).stat().st_uid == 1000
        assert os.listdir(versions / "disk" / "usr" / "bin" / "big.bin") == [b0, b2]
        assert "relative-link" not in os.listdir(versions / "disk" / "usr" / "bin")  # only what has versions
        latin_versions = os.fsencode(versions / "disk" / "usr" / "bin") + b"/caf\xe9"
        assert os.listdir(latin_versions) == [b2.encode()]
        assert open(latin_versions + b"/" + b2.encode(), "rb").read() == b"latin-1\n"
        _refused(errno.ENOENT, os.stat, versions / "disk" / "etc" / "never-there")
        _refused(errno.ENOENT, os.stat, hostname / b2)  # no version of its own

        # -- read-only everywhere ------------------------------------------------------------------
        _refused(errno.EROFS, os.open, hostname / b0, os.O_WRONLY)
        _refused(errno.EROFS, os.open, changes / b1, os.O_WRONLY)
        _refused(errno.EROFS, os.unlink, changes / b1)
        _refused(errno.EROFS, os.unlink, hostname / b0)
        _refused(errno.EROFS, os.mkdir, hostname / "x")
        _refused(errno.EROFS, os.mkdir, changes / "x")
        _refused(errno.EROFS, os.chmod, hostname / b0, 0o777)
        _refused(errno.EROFS, os.truncate, changes / b1, 0)
        _refused(errno.EROFS, os.setxattr, hostname / b0, "user.x", b"1")

        # -- the bytes that differ, for --blocks after unmounting ------------------------------------
        backups = vm / "backups"
        pieces = {(a, b): _differing_pieces(backups / a, backups / b) for a, b in ((b0, b4), (b1, b2))}
        assert pieces[(b0, b4)] and pieces[(b1, b2)]
        diff_mounted = cli("diff", repo, "vm", b0, b1, check=False)
        assert diff_mounted.returncode == 1 and str(changes) in diff_mounted.stderr.decode()
        by_backup = {i: (changes / i).read_bytes() for i in ids}
        m.stop()

        # -- backupfs diff ------------------------------------------------------------------------------
        assert cli("diff", repo, "vm", b0, b1).stdout == by_backup[b1]
        assert cli("diff", repo, "vm", b3, "latest").stdout == by_backup[b4]
        whole = cli("diff", repo, "vm", b0, b4).stdout.decode().splitlines()
        for line in ("M\tdisk/etc/hostname", "A\tdisk/etc/new.conf", "M\tdisk/usr/bin/big.bin",
                     "D\tdisk/home/alice/with space.txt", "m\tdisk/etc/shadow"):
            assert line in whole
        as_json = json.loads(cli("diff", repo, "vm", b0, b4, "--json").stdout)
        assert [f"{c['op']}\t{c['path']}" for c in as_json] == whole
        assert all(c["volume"] == "disk" for c in as_json)
        [latin] = [c for c in as_json if "path_b64" in c]
        assert latin["path"] == "disk/usr/bin/caf\\xe9"
        assert base64.b64decode(latin["path_b64"]) == b"disk/usr/bin/caf\xe9"
        backwards = cli("diff", repo, "vm", b2, b1, check=False)
        assert backwards.returncode == 1 and "give the older backup first" in backwards.stderr.decode()
        found_ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for a, b in pieces:
            lines = cli("diff", repo, "vm", a, b, "--blocks").stdout.decode().splitlines()
            ranges = [(int(s), int(e)) for s, e in (line.split() for line in lines)]
            assert ranges == sorted(ranges) and all(s < e for s, e in ranges)
            blocks_json = json.loads(cli("diff", repo, "vm", a, b, "--blocks", "--json").stdout)
            assert [(r["start"], r["end"]) for r in blocks_json] == ranges
            found_ranges[(a, b)] = ranges  # checked against the bytes below, mounted again

        # -- prune: B1 merged into B2 ------------------------------------------------------------------------
        m.start()
        for (a, b), ranges in found_ranges.items():
            for off in pieces[(a, b)]:
                assert _covered(ranges, backups / a, backups / b, off), (a, b, off)
        sh(f"echo 'prune remove={b1}' > {vm / 'snapshot'}")
        assert sorted(os.listdir(changes)) == [b0, b2, b3, b4]
        _refused(errno.ENOENT, os.stat, changes / b1)
        merged = _lines(changes / b2)  # now from B0: B1's changes and B2's
        assert "M\tdisk/etc/hostname" in merged and "M\tdisk/usr/bin/big.bin" in merged
        assert os.listdir(hostname) == [b0, b2, b3]
        assert (hostname / b2).read_bytes() == b"guest-two\n"
        m.stop()
    finally:
        m.cleanup()


@pytest.mark.mount
def test_files_owner_only_keeps_other_users_out_of_history(
        tmp_path: Path, other_user: OtherUser, open_tmp: Path) -> None:
    """changes/ and versions/ show a guest's names and bytes: with allow_other
    the guest's modes apply (alice's 0700 home keeps others out of its
    versions, as in files/); with files_owner_only nobody but the owner gets in."""
    image = make_fs("ext4", tmp_path, default_tree())
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", image)
    cli("backup", repo, "vm", "full")
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    for options, allowed in (("allow_other", True), ("allow_other,files_owner_only", False)):
        m = Mounted(repo, mnt, options=options)
        m.start()
        try:
            vm = mnt / "vm"
            [ident] = os.listdir(vm / "changes")
            listed = other_user.run("ls", vm / "changes")
            assert (listed.returncode == 0) == allowed, listed.stderr
            version = vm / "versions" / "disk" / "etc" / "hostname" / ident
            read = other_user.run("cat", version)
            assert (read.returncode == 0) == allowed, read.stderr
            if allowed:
                assert read.stdout == "guest\n"
            notes = other_user.run("ls", vm / "versions" / "disk" / "home" / "alice")
            assert notes.returncode != 0 and "Permission denied" in notes.stderr
            assert version.read_bytes() == b"guest\n"  # the owner (root) always
            m.stop()
        finally:
            m.cleanup()


def test_listing_and_stat_of_changes_parse_nothing(repo: Repository, tmp_path: Path) -> None:
    """`ls -l changes/` costs what `ls -l backups/` costs: the catalog, no backup opened;
    the comparison runs when a file's text is asked for (at open)."""
    image = make_fs("ext4", tmp_path, default_tree())
    repo.add_device("vm", str(image))
    ids = [repo.backup("vm", "full" if i == 0 else "incremental", allow_empty=True).record.id for i in range(30)]
    tree = Tree(repo, Statuses(), 1_234_567_890)
    disks = FilesCache(ViewCache(repo))
    HistoryView(tree, disks, History(repo, open_disk=disks.using))
    changes = tree.child(tree.inodes.get(DEVDIR, "vm"), b"changes")
    assert changes.kind == CHANGES
    listing = tree.children(changes)
    assert [n for n, _ in listing] == [i.encode() for i in ids]
    sizes = {tree.attributes(node).size for _, node in listing}
    assert sizes == {0} and all(node.kind == CHANGES_FILE for _, node in listing)
    assert disks.open_ids() == []
    assert tree.text(listing[0][1]) == b""  # the full backup: no parent, never opened
    assert disks.open_ids() == []
    assert tree.text(listing[-1][1]) == b""  # nothing changed: the chains' tables say so...
    assert disks.open_ids() == []  # ...so no filesystem was read
    disks.drop_all()
