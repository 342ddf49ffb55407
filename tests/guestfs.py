"""Guest filesystem images made by the real tools, and the kernel's view of them.

One builder per filesystem type, each writing an image file of one
filesystem filled with a ``TreeSpec``: ``make_fs(fstype, directory, spec)``.
The tools fill what they can without mounting (mkfs.ext4 -d, mkfs.btrfs
--rootdir, mtools for FAT); XFS, exFAT and NTFS are filled through a loop
mount, so their builders need root and a test marked ``mount``
(``NEEDS_MOUNT`` says which). ``kernel_view`` is the oracle: the same tree as
this host's kernel (or FUSE driver) shows it.

Nothing touches the host beyond the loop devices and mounts made here, each
undone in a ``finally``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.guesttree import Dir, HardLink, MiB, TreeSpec, View, fit, populate, walk_view

# Filesystem types whose builder mounts (root, and the `mount` marker).
NEEDS_MOUNT = frozenset({"xfs", "btrfs", "exfat", "ntfs"})

# Default image sizes: the smallest each mkfs accepts for the default tree.
DEFAULT_SIZES = {"ext4": 32 * MiB, "ext2": 32 * MiB, "xfs": 64 * MiB, "btrfs": 128 * MiB,
                 "vfat": 33 * MiB, "exfat": 32 * MiB, "ntfs": 32 * MiB}

# `mount -t` for each filesystem type (exFAT and NTFS through their FUSE drivers:
# this kernel has neither, nor vfat).
MOUNT_TYPES = {"ext4": "ext4", "ext2": "ext2", "xfs": "xfs", "btrfs": "btrfs",
               "exfat": "exfat-fuse", "ntfs": "ntfs-3g"}

# The kernel's private directories at a filesystem's root, not part of the tree.
RESERVED_NAMES = {"ext4": frozenset({"lost+found"}), "ext2": frozenset({"lost+found"})}

# Every filesystem that takes one gets this UUID, so that a build is repeatable.
FIXED_UUID = "21212121-2121-4121-8121-212121212121"

# mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under
# fstests; these are what it checks for.
_XFS_SMALL_OK = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def run(*args: str | os.PathLike[str], env: dict[str, str] | None = None, input: bytes | None = None) -> str:
    """Run a tool; raise with its output when it fails (these are build steps, not assertions)."""
    proc = subprocess.run([os.fspath(a) for a in args], capture_output=True, input=input, timeout=120,
                          env={**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(os.fspath, args))} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')}{proc.stdout.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def sparse_image(path: Path, size: int) -> Path:
    """An empty (all-hole) file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ----------------------------------------------------------- loop mounts


@contextmanager
def loop_device(image: Path, offset: int = 0, size: int | None = None, read_only: bool = False) -> Iterator[str]:
    """A loop device over ``size`` bytes of ``image`` from ``offset``; detached on the way out."""
    args = ["losetup", "--find", "--show", f"--offset={offset}"]
    args += [f"--sizelimit={size}"] if size is not None else []
    args += ["--read-only"] if read_only else []
    device = run(*args, image).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60)


@contextmanager
def mounted(image: Path, fstype: str, offset: int = 0, size: int | None = None,
            read_only: bool = False) -> Iterator[Path]:
    """``image``'s filesystem at ``offset`` mounted on a fresh directory; unmounted and detached after."""
    with loop_device(image, offset, size, read_only) as device, \
            tempfile.TemporaryDirectory(prefix="guestfs-") as where:
        options = ["-o", "ro"] if read_only else []
        run("mount", "-t", MOUNT_TYPES[fstype], *options, device, where)
        try:
            yield Path(where)
        finally:
            proc = subprocess.run(["umount", where], capture_output=True, timeout=120)
            if proc.returncode != 0:  # busy: never leave the loop device attached behind a mount
                subprocess.run(["umount", "--lazy", where], capture_output=True, timeout=60)


def kernel_view(image: Path, offset: int, fstype: str, size: int | None = None) -> View:
    """The tree in ``image``'s ``fstype`` filesystem at ``offset`` as this host reads it.

    The oracle a user-space reader is compared with. Mounted read-only by
    the kernel (ext2/4, XFS, Btrfs) or its FUSE driver (exFAT, NTFS): root
    and the `mount` marker. FAT, which this kernel lacks, is read by
    copying it out with mtools (no mount; directory times are not kept).
    """
    if fstype == "vfat":
        return _mtools_view(image, offset, size)
    with mounted(image, fstype, offset, size, read_only=True) as where:
        return walk_view(where, fstype, RESERVED_NAMES.get(fstype, frozenset()))


def _mtools_view(image: Path, offset: int, size: int | None) -> View:
    """A FAT filesystem copied out by mtools (times kept by -m), then walked.

    mtools takes no size limit: ``size`` is not needed, the FAT's own size
    bounds what it reads."""
    with tempfile.TemporaryDirectory(prefix="guestfs-fat-") as out:
        run("mcopy", "-s", "-m", "-n", "-i", f"{image}@@{offset}", "::/*", out)
        return walk_view(Path(out), "vfat")


# --------------------------------------------------------------- builders


def make_fs(fstype: str, directory: Path, spec: TreeSpec, size: int | None = None,
            label: str = "guest") -> Path:
    """An image file in ``directory`` holding one ``fstype`` filesystem filled with ``spec``.

    ``fstype``: ext4, ext2, xfs, btrfs, vfat (FAT12/16/32 by size, or
    vfat12/vfat16/vfat32 to force one), exfat or ntfs. Builders in
    NEEDS_MOUNT mount the image (root, the `mount` marker).
    """
    builder = _BUILDERS[fstype]
    image = sparse_image(directory / f"{fstype}.img", size or DEFAULT_SIZES[base_fstype(fstype)])
    builder(image, spec, label)
    return image


def written_label(fstype: str, label: str) -> str:
    """The label ``fstype``'s mkfs writes when given ``label``: what a reader should show.

    FAT labels are upper case, at most 11 characters; XFS keeps 12, exFAT 11.
    """
    fs = base_fstype(fstype)
    if fs == "vfat":
        return label.upper()[:11]
    return label[:{"xfs": 12, "exfat": 11}.get(fs, len(label))]


def base_fstype(fstype: str) -> str:
    """The filesystem a builder's name makes (vfat16 makes vfat)."""
    return "vfat" if fstype.startswith("vfat") else fstype


@contextmanager
def staged(spec: TreeSpec, fstype: str) -> Iterator[Path]:
    """A host directory holding ``spec`` as ``fstype`` can hold it, for mkfs to copy from."""
    with tempfile.TemporaryDirectory(prefix="guestfs-src-") as src:
        populate(spec, Path(src), fstype)
        os.chmod(src, 0o755)
        yield Path(src)


def _ext(fstype: str) -> Callable[[Path, TreeSpec, str], None]:
    def build(image: Path, spec: TreeSpec, label: str) -> None:
        """mke2fs -d copies the tree with owners, modes, xattrs and hard links, but times in
        whole seconds (e2fsprogs 1.47.0): debugfs then writes the nanoseconds, no mount needed.
        256-byte inodes, which have room for them."""
        with staged(spec, fstype) as src:
            run(f"mkfs.{fstype}", "-q", "-F", "-I", "256", "-L", label, "-U", FIXED_UUID,
                "-E", f"root_owner=0:0,hash_seed={FIXED_UUID}", "-d", src, image)
        _ext_set_nanoseconds(image, fit(spec, fstype))
    return build


# One line of `debugfs -R "ls -p DIR"`: /inode/mode/uid/gid/name/size/ (a name holds no '/').
_DEBUGFS_LS_LINE = re.compile(r"^/(\d+)/\d+/\d+/\d+/([^/]*)/\d*/$", re.M)


def _ext_inodes(image: Path, spec: TreeSpec) -> dict[str, int]:
    """The inode number of each path of ``spec`` in an ext image, read with debugfs."""
    inodes: dict[str, int] = {}
    for directory in [""] + [e.path for e in spec.entries if isinstance(e, Dir)]:
        listing = run("debugfs", "-R", f'ls -p "/{directory}"', image)
        for number, name in _DEBUGFS_LS_LINE.findall(listing):
            if name not in (".", ".."):
                inodes[f"{directory}/{name}".lstrip("/")] = int(number)
    return inodes


def _ext_set_nanoseconds(image: Path, spec: TreeSpec) -> None:
    """Write each entry's nanoseconds into its inode's mtime_extra and atime_extra.

    The extra field holds nanoseconds << 2 (its low two bits extend the
    seconds past 2038; zero for the years used here).
    """
    inodes = _ext_inodes(image, spec)
    commands = []
    for entry in spec.entries:
        if isinstance(entry, HardLink):
            continue
        extra = (entry.mtime_ns % 1_000_000_000) << 2
        inode = inodes[entry.path]
        commands += [f"set_inode_field <{inode}> {field} {extra}" for field in ("mtime_extra", "atime_extra")]
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        run("debugfs", "-w", "-f", script.name, image)


def _btrfs(image: Path, spec: TreeSpec, label: str) -> None:
    """mkfs.btrfs, then filled by a loop mount: btrfs-progs 6.2's --rootdir keeps times in whole
    seconds and writes device numbers as 0:0, and nothing edits them offline."""
    run("mkfs.btrfs", "-q", "-f", "-L", label, "-U", FIXED_UUID, image)
    _fill_mounted(image, spec, "btrfs")


def _vfat(fat_bits: int | None) -> Callable[[Path, TreeSpec, str], None]:
    def build(image: Path, spec: TreeSpec, label: str) -> None:
        """mkfs.vfat, then mtools copies the tree in (-m keeps modification times; TZ=UTC,
        as FAT stores local time)."""
        bits = ["-F", str(fat_bits)] if fat_bits else []
        run("mkfs.vfat", *bits, "-i", "21212121", "-n", written_label("vfat", label), image)
        with staged(spec, "vfat") as src:
            names = sorted(os.listdir(src))
            if names:
                run("mcopy", "-s", "-m", "-i", image, *[src / n for n in names], "::/")
    return build


def _xfs(image: Path, spec: TreeSpec, label: str) -> None:
    """mkfs.xfs (6.1's protofile sets no times, xattrs or hard links), then filled by a loop mount."""
    run("mkfs.xfs", "-q", "-f", "-L", written_label("xfs", label), "-m", f"uuid={FIXED_UUID}",
        image, env=_XFS_SMALL_OK)
    _fill_mounted(image, spec, "xfs")


def _exfat(image: Path, spec: TreeSpec, label: str) -> None:
    """mkfs.exfat, then filled through exfat-fuse (this kernel has no exFAT)."""
    run("mkfs.exfat", "-L", written_label("exfat", label), image)
    _fill_mounted(image, spec, "exfat")


def _ntfs(image: Path, spec: TreeSpec, label: str) -> None:
    """mkntfs -Q, then filled through ntfs-3g (user.* xattrs become named streams)."""
    run("mkntfs", "-F", "-Q", "-q", "-L", label, "-s", "512", "-p", "0", "-H", "0", "-S", "0", image)
    _fill_mounted(image, spec, "ntfs")


def _fill_mounted(image: Path, spec: TreeSpec, fstype: str) -> None:
    """Write ``spec`` into the image's filesystem through a loop mount."""
    with mounted(image, fstype) as where:
        populate(spec, where, fstype)


_BUILDERS: dict[str, Callable[[Path, TreeSpec, str], None]] = {
    "ext4": _ext("ext4"), "ext2": _ext("ext2"), "btrfs": _btrfs, "xfs": _xfs,
    "vfat": _vfat(None), "vfat12": _vfat(12), "vfat16": _vfat(16), "vfat32": _vfat(32),
    "exfat": _exfat, "ntfs": _ntfs,
}


def add_btrfs_subvolume(image: Path, name: str, spec: TreeSpec) -> None:
    """A second Btrfs subvolume ``name`` at the root, filled with ``spec`` (mounts: root, `mount`).

    mkfs.btrfs 6.2 cannot make subvolumes, so the kernel does it.
    """
    with mounted(image, "btrfs") as where:
        run("btrfs", "subvolume", "create", where / name)
        populate(spec, where / name, "btrfs")
