"""Hostile cases for history (SPEC §9) that the oracle tests did not cover.

Each case is a guest's change through a kernel mount of the source, then an
incremental, checked the way tests/test_history_oracle.py checks (exact
lines, rsync between kernel mounts of the two backups, fast path equal to
the whole-tree comparison): truncated and re-extended files, punched holes,
zeroed ranges (unwritten extents at the same place), an xattr on a
directory, a rename over a file with identical bytes and times, a new
subtree inside a changed directory, names with tabs, control bytes and
non-UTF-8 bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_history_oracle import Case, lines, run_case, shown

pytestmark = pytest.mark.mount

BIG = ("usr", "bin", "big.bin")


def _keep_mtime(path: Path, change) -> None:  # type: ignore[no-untyped-def]
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
        back = repo.backup("vm", "incremental", scan=True)  # nothing changed: nothing to say
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
