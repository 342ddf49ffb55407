"""What goes into a guest filesystem, and what a reader of it should show.

The file-level restore tests compare a filesystem parsed from a backup with
what was put into it. This module holds both sides of that comparison,
independent of any filesystem: a tree spec (``TreeSpec``), a writer that puts
it into a host directory (``populate``), and the view a reader gives
(``View``), made either from a spec (``expected_view``) or by walking a
directory (``walk_view``). What a filesystem cannot hold (symlinks on FAT,
owners on NTFS, nanoseconds anywhere but ext4/XFS/Btrfs) is stated once, in
``CAPABILITIES``, and applied to both sides, so the tests never pretend.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

MiB = 1024 * 1024


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True, kw_only=True)
class Node:
    """Attributes every entry has: where it is, who owns it, when it changed.

    ``path`` is relative to the filesystem's root, '/'-separated.
    """

    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_600_000_000_000_000_000


@dataclass(frozen=True, kw_only=True)
class File(Node):
    """A regular file of ``size`` bytes: ``extents`` (offset, bytes) written, the rest a hole.

    A file with one extent at 0 covering its size is a plain file; anything
    else leaves holes that read as zeros.
    """

    size: int
    extents: tuple[tuple[int, bytes], ...] = ()
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def content(self) -> bytes:
        """The bytes a reader gets: the extents, zeros in the holes."""
        data = bytearray(self.size)
        for offset, chunk in self.extents:
            data[offset:offset + len(chunk)] = chunk
        return bytes(data)


@dataclass(frozen=True, kw_only=True)
class Dir(Node):
    mode: int = 0o755
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, kw_only=True)
class Symlink(Node):
    """A symlink; its target is text, never resolved (it may dangle, or be absolute)."""

    target: str
    mode: int = 0o777


@dataclass(frozen=True, kw_only=True)
class HardLink:
    """A second name for the File at ``to`` (same inode, same attributes)."""

    path: str
    to: str


@dataclass(frozen=True, kw_only=True)
class Fifo(Node):
    pass


@dataclass(frozen=True, kw_only=True)
class CharDevice(Node):
    major: int
    minor: int


Entry = File | Dir | Symlink | HardLink | Fifo | CharDevice


@dataclass(frozen=True)
class TreeSpec:
    """A file tree, parents listed before their children."""

    entries: tuple[Entry, ...]

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}


def plain(path: str, data: bytes, **attrs: object) -> File:
    """A regular file holding ``data`` (no holes)."""
    return File(path=path, size=len(data), extents=((0, data),), **attrs)  # type: ignore[arg-type]


def default_tree() -> TreeSpec:
    """A tree with one of everything a restore must get right.

    Times are fixed and deliberately not aligned to any filesystem's
    resolution (odd nanoseconds), so each filesystem's truncation shows.
    """
    base = 1_650_000_000_123_456_789

    def t(i: int) -> int:
        """Times a day, an hour, a minute and 1.001234567 s apart: odd and even seconds alike."""
        return base + i * 90_061_001_234_567

    big = random.Random(21).randbytes(3 * MiB + 12345)
    sparse_size = 2 * MiB + 100
    return TreeSpec((
        Dir(path="etc", mode=0o755, mtime_ns=t(1)),
        plain("etc/hostname", b"guest\n", mtime_ns=t(2)),
        plain("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42, mtime_ns=t(3)),
        Dir(path="home", mtime_ns=t(4)),
        Dir(path="home/alice", mode=0o700, uid=1000, gid=1000, mtime_ns=t(5),
            xattrs=(("user.dir.note", b"alice's home"),)),
        plain("home/alice/notes.txt", b"remember the milk\n" * 100, mode=0o600, uid=1000, gid=1000,
              mtime_ns=t(6), xattrs=(("user.comment", b"shopping"), ("user.empty", b""),
                                     ("user.binary", bytes(range(256))))),
        plain("home/alice/with space.txt", b"a name with spaces\n", uid=1000, gid=1001, mtime_ns=t(7)),
        plain("home/alice/ünïcödé 日本.txt", "UTF-8 name\n".encode(), uid=1000, gid=1000, mtime_ns=t(8)),
        plain("home/alice/new\nline", b"a newline in the name\n", uid=1000, gid=1000, mtime_ns=t(9)),
        plain("home/alice/empty", b"", uid=1000, gid=1000, mtime_ns=t(10)),
        HardLink(path="home/alice/notes-link.txt", to="home/alice/notes.txt"),
        Dir(path="usr", mtime_ns=t(11)),
        Dir(path="usr/bin", mtime_ns=t(12)),
        plain("usr/bin/suid-tool", b"\x7fELF" + bytes(1000), mode=0o4755, mtime_ns=t(13)),
        plain("usr/bin/big.bin", big, mode=0o755, mtime_ns=t(14)),
        File(path="usr/bin/sparse.img", size=sparse_size, mtime_ns=t(15),
             extents=((0, b"start" * 100), (sparse_size - 4096, b"E" * 4096))),
        Symlink(path="usr/bin/relative-link", target="big.bin", mtime_ns=t(16)),
        Symlink(path="usr/bin/absolute-link", target="/etc/hostname", mtime_ns=t(17)),
        Symlink(path="usr/bin/dangling-link", target="../nowhere/missing", uid=1000, gid=1000, mtime_ns=t(18)),
        Dir(path="dev", mtime_ns=t(19)),
        CharDevice(path="dev/null", major=1, minor=3, mode=0o666, mtime_ns=t(20)),
        Fifo(path="dev/pipe", mode=0o620, uid=1001, gid=1001, mtime_ns=t(21)),
        Dir(path="empty-dir", mode=0o750, mtime_ns=t(22)),
    ))


# --------------------------------------------------- what each fs can hold


@dataclass(frozen=True)
class Capabilities:
    """What a filesystem keeps of a tree (a reader cannot show what was not kept).

    ``mtime_step_ns``: the resolution of its modification times (they are
    truncated to it). ``name_forbidden``: characters its names cannot hold.
    """

    symlinks: bool = True
    hardlinks: bool = True
    special_files: bool = True
    owners: bool = True
    modes: bool = True
    xattrs: bool = True
    dir_xattrs: bool = True
    dir_mtimes: bool = True
    mtime_step_ns: int = 1
    name_forbidden: str = ""


_UNIX = Capabilities()
_FAT_LIKE = dict(symlinks=False, hardlinks=False, special_files=False, owners=False, modes=False,
                 xattrs=False, dir_xattrs=False,
                 name_forbidden="".join(map(chr, range(32))) + '"*:<>?\\|')

CAPABILITIES: dict[str, Capabilities] = {
    "host": _UNIX,
    "ext4": _UNIX,
    "ext2": _UNIX,
    "xfs": _UNIX,
    "btrfs": _UNIX,
    # mtools sets no directory times (it stamps them with the copy's time).
    "vfat": Capabilities(**_FAT_LIKE, mtime_step_ns=2_000_000_000, dir_mtimes=False),  # type: ignore[arg-type]
    # exFAT keeps 10 ms, but exfat-fuse (the only writer here) sets whole seconds.
    "exfat": Capabilities(**_FAT_LIKE, mtime_step_ns=1_000_000_000),  # type: ignore[arg-type]
    # NTFS keeps ACLs, not POSIX owners and modes; ntfs-3g could make FIFOs and
    # devices as Interix files, which no reader is asked to show.
    "ntfs": Capabilities(special_files=False, owners=False, modes=False, mtime_step_ns=100),
}


def fit(spec: TreeSpec, fstype: str) -> TreeSpec:
    """The part of ``spec`` that ``fstype`` can hold (an entry it cannot, and what is under it, left out)."""
    caps = CAPABILITIES[fstype]
    kept: list[Entry] = []
    dropped: set[str] = set()
    for entry in spec.entries:
        parent = entry.path.rpartition("/")[0]
        if parent in dropped or any(c in caps.name_forbidden for c in entry.path):
            dropped.add(entry.path)
            continue
        if (isinstance(entry, Symlink) and not caps.symlinks) or (
                isinstance(entry, HardLink) and (not caps.hardlinks or entry.to in dropped)) or (
                isinstance(entry, (Fifo, CharDevice)) and not caps.special_files):
            dropped.add(entry.path)
            continue
        kept.append(entry)
    return TreeSpec(tuple(kept))


# ------------------------------------------------------------ populating


def populate(spec: TreeSpec, root: Path, fstype: str = "host") -> None:
    """Write ``fit(spec, fstype)`` into the existing directory ``root``, attributes and all.

    Run as root (chown, mknod). Attributes the filesystem does not keep are
    not set (ntfs-3g refuses chown). Times are set last, directories deepest
    first, so that creating a child does not move its parent's mtime.
    """
    caps = CAPABILITIES[fstype]
    entries = fit(spec, fstype).entries
    for entry in entries:
        _create(entry, root)
    for entry in entries:
        if isinstance(entry, HardLink):
            continue
        where = root / entry.path
        if caps.owners:
            os.chown(where, entry.uid, entry.gid, follow_symlinks=False)
        if caps.modes and not isinstance(entry, Symlink):
            os.chmod(where, entry.mode)  # after chown, which clears setuid
        if isinstance(entry, (File, Dir)) and caps.xattrs and (caps.dir_xattrs or isinstance(entry, File)):
            for name, value in entry.xattrs:
                os.setxattr(where, name, value)
    for entry in sorted(entries, key=lambda e: -e.path.count("/")):
        if not isinstance(entry, HardLink):
            os.utime(root / entry.path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _create(entry: Entry, root: Path) -> None:
    """Make one entry under ``root``, without its attributes."""
    where = root / entry.path
    if isinstance(entry, Dir):
        where.mkdir()
    elif isinstance(entry, File):
        with open(where, "wb") as f:
            for offset, chunk in entry.extents:
                f.seek(offset)
                f.write(chunk)
            f.truncate(entry.size)
    elif isinstance(entry, Symlink):
        os.symlink(entry.target, where)
    elif isinstance(entry, HardLink):
        os.link(root / entry.to, where)
    elif isinstance(entry, Fifo):
        os.mkfifo(where)
    elif isinstance(entry, CharDevice):
        os.mknod(where, stat.S_IFCHR | 0o600, os.makedev(entry.major, entry.minor))


# ------------------------------------------------------------------ views


@dataclass(frozen=True)
class Seen:
    """One name as a reader shows it; None where the filesystem keeps nothing to show.

    ``kind``: file, dir, symlink, fifo or chr. ``mode``: the permission bits
    (07777), not the type. ``xattrs``: the ``user.*`` ones, sorted.
    """

    kind: str
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] | None = None
    rdev: tuple[int, int] | None = None


@dataclass(frozen=True)
class View:
    """A whole tree as a reader shows it: each path, and which paths are one inode."""

    entries: dict[str, Seen]
    hardlinks: frozenset[frozenset[str]] = field(default_factory=frozenset)


def _seen_of(entry: Entry) -> Seen:
    """The full view of one spec entry (before any filesystem drops a thing)."""
    assert not isinstance(entry, HardLink)
    common = dict(mode=entry.mode, uid=entry.uid, gid=entry.gid, mtime_ns=entry.mtime_ns)
    if isinstance(entry, File):
        return Seen("file", size=entry.size, sha256=hashlib.sha256(entry.content()).hexdigest(),
                    xattrs=tuple(sorted(entry.xattrs)), **common)  # type: ignore[arg-type]
    if isinstance(entry, Dir):
        return Seen("dir", xattrs=tuple(sorted(entry.xattrs)), **common)  # type: ignore[arg-type]
    if isinstance(entry, Symlink):
        return Seen("symlink", target=entry.target, **common)  # type: ignore[arg-type]
    if isinstance(entry, Fifo):
        return Seen("fifo", **common)  # type: ignore[arg-type]
    return Seen("chr", rdev=(entry.major, entry.minor), **common)  # type: ignore[arg-type]


def masked(seen: Seen, fstype: str) -> Seen:
    """``seen`` with what ``fstype`` does not keep set to None (a symlink's mode is always 0777)."""
    caps = CAPABILITIES[fstype]
    keeps_xattrs = caps.xattrs and (caps.dir_xattrs or seen.kind == "file") and seen.kind in ("file", "dir")
    return replace(
        seen,
        mode=seen.mode if caps.modes and seen.kind != "symlink" else None,
        uid=seen.uid if caps.owners else None,
        gid=seen.gid if caps.owners else None,
        mtime_ns=None if seen.kind == "dir" and not caps.dir_mtimes else seen.mtime_ns,
        xattrs=seen.xattrs if keeps_xattrs else None,
    )


def expected_view(spec: TreeSpec, fstype: str) -> View:
    """What a correct reader of a ``fstype`` filesystem filled from ``spec`` shows."""
    caps = CAPABILITIES[fstype]
    kept = fit(spec, fstype)
    by_path = kept.by_path()
    entries: dict[str, Seen] = {}
    groups: dict[str, set[str]] = {}
    for entry in kept.entries:
        source = by_path[entry.to] if isinstance(entry, HardLink) else entry
        if isinstance(entry, HardLink):
            groups.setdefault(entry.to, {entry.to}).add(entry.path)
        seen = masked(_seen_of(source), fstype)
        if seen.mtime_ns is not None:
            seen = replace(seen, mtime_ns=seen.mtime_ns - seen.mtime_ns % caps.mtime_step_ns)
        entries[entry.path] = seen
    return View(entries, frozenset(frozenset(g) for g in groups.values()))


def walk_view(root: Path, fstype: str, skip: frozenset[str] = frozenset()) -> View:
    """What the host's kernel shows under ``root`` (a mounted filesystem, or a plain directory).

    ``skip``: top-level names the filesystem makes itself (ext's lost+found).
    Never follows a symlink; reads file contents to hash them.
    """
    entries: dict[str, Seen] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(path)
            entries[rel] = masked(_seen_on_host(path, st), fstype)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(rel)
    return View(entries, frozenset(frozenset(g) for g in inodes.values() if len(g) > 1))


def _seen_on_host(path: str, st: os.stat_result) -> Seen:
    """One name as os.lstat, os.readlink and os.listxattr give it."""
    common = dict(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        return Seen("symlink", target=os.readlink(path), **common)  # type: ignore[arg-type]
    if stat.S_ISFIFO(st.st_mode):
        return Seen("fifo", **common)  # type: ignore[arg-type]
    if stat.S_ISCHR(st.st_mode):
        return Seen("chr", rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **common)  # type: ignore[arg-type]
    xattrs = _user_xattrs(path)
    if stat.S_ISDIR(st.st_mode):
        return Seen("dir", xattrs=xattrs, **common)  # type: ignore[arg-type]
    if not stat.S_ISREG(st.st_mode):
        return Seen(f"other:{stat.S_IFMT(st.st_mode):o}", **common)  # type: ignore[arg-type]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return Seen("file", size=st.st_size, sha256=digest.hexdigest(), xattrs=xattrs, **common)  # type: ignore[arg-type]


def _user_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """The ``user.*`` extended attributes of ``path``, sorted; none where the fs has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names if n.startswith("user.")))


def differences(expected: View, actual: View) -> list[str]:
    """Each way ``actual`` differs from ``expected``, one readable line each (empty: equal)."""
    lines = [f"missing: {p!r}" for p in sorted(expected.entries.keys() - actual.entries.keys())]
    lines += [f"unexpected: {p!r} {actual.entries[p]}" for p in sorted(actual.entries.keys() - expected.entries.keys())]
    for path in sorted(expected.entries.keys() & actual.entries.keys()):
        want, got = expected.entries[path], actual.entries[path]
        for name in want.__dataclass_fields__:
            if getattr(want, name) != getattr(got, name):
                lines.append(f"{path!r} {name}: expected {getattr(want, name)!r}, got {getattr(got, name)!r}")
    if expected.hardlinks != actual.hardlinks:
        lines.append(f"hard links: expected {sorted(map(sorted, expected.hardlinks))}, "
                     f"got {sorted(map(sorted, actual.hardlinks))}")
    return lines
