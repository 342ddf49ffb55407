"""Small real guest disks, made by the real tools, for the hostile-guest tests and the fuzzer.

Every image is built without a mount (mkfs -d / --rootdir / a protofile,
mtools, ntfscp), so tests that use them need no root and no FUSE. Every
file put in holds only the byte ``FILL`` (0xA5): a sector made of 0xA5
and zeros is file data, and every other non-zero sector is the
filesystem's own metadata (superblocks, descriptors, inode tables,
directory blocks, FATs, the MFT, B-tree nodes). That is where a mutation
does harm, so ``metadata_sectors`` lists those sectors for the fuzzer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
FILL = 0xA5
LONG_LINK = "t/" * 300  # a 600-byte target: stored out of the inode on every filesystem


@dataclass(frozen=True)
class SeedImage:
    """A valid guest disk and the sectors worth corrupting in it."""

    name: str
    path: Path
    size: int
    metadata: tuple[int, ...] = field(repr=False)  # sector numbers


def sh(*cmd: str | os.PathLike[str], cwd: Path | None = None) -> None:
    """Run a tool; raise with its output if it fails (a broken seed is no test)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr}{proc.stdout}")


def content(size: int) -> bytes:
    return bytes([FILL]) * size


def make_tree(root: Path) -> Path:
    """The files every seed holds: nested directories, a directory of 150
    entries (several blocks, an htree or a B-tree on the larger
    filesystems), short and long symlinks, a hard link, a sparse file, a
    file of many blocks, and a user xattr."""
    root.mkdir(parents=True)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(content(100))
    (root / "a" / "small.txt").write_bytes(content(10))
    (root / "big.bin").write_bytes(content(300 * KiB))
    many = root / "many"
    many.mkdir()
    for i in range(150):
        (many / f"file-with-a-long-name-{i:04d}.txt").write_bytes(content(i % 7 * 600 + 1))
    with open(root / "sparse.bin", "wb") as f:
        f.write(content(4096))
        f.seek(1 * MiB)
        f.write(content(4096))
    os.link(root / "a" / "small.txt", root / "hardlink.txt")
    os.symlink("a/small.txt", root / "short-link")
    os.symlink(LONG_LINK, root / "long-link")
    os.setxattr(root / "a" / "small.txt", "user.note", b"seed")
    return root


def metadata_sectors(path: Path) -> tuple[int, ...]:
    """The non-zero sectors of an image that are not file data (see the module docstring)."""
    out: list[int] = []
    zero = bytes(SECTOR)
    with open(path, "rb") as f:
        base = 0
        while True:
            chunk = f.read(4 * MiB)
            if not chunk:
                break
            for i in range(0, len(chunk), SECTOR):
                sector = chunk[i : i + SECTOR]
                if sector == zero or not sector.translate(None, b"\xa5\x00"):
                    continue
                out.append((base + i) // SECTOR)
            base += len(chunk)
    return tuple(out)


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def ext4(path: Path, tree: Path, features: str = "") -> None:
    """ext4 (4 KiB blocks) with ``tree`` in it; ``features`` as mkfs.ext4 -O takes them."""
    sparse_file(path, 8 * MiB)
    args = ["-O", features] if features else []
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "512", *args, "-d", tree, path)


def ext2(path: Path, tree: Path) -> None:
    """ext2 with 1 KiB blocks: block maps (indirect blocks) instead of extents."""
    sparse_file(path, 8 * MiB)
    sh("mkfs.ext2", "-q", "-F", "-b", "1024", "-d", tree, path)


def _proto_lines(directory: Path, depth: int) -> list[str]:
    """mkfs.xfs protofile lines for a directory's contents (xfsprogs 6.1 takes no directory)."""
    pad = " " * depth
    lines: list[str] = []
    for item in sorted(directory.iterdir()):
        if item.is_symlink() and len(os.readlink(item)) > 300:
            continue  # mkfs.xfs 6.1 writes a remote symlink block without its header: xfs_repair rejects it
        if item.is_symlink():
            lines.append(f"{pad}{item.name} l--777 0 0 {os.readlink(item)}")
        elif item.is_dir():
            lines.append(f"{pad}{item.name} d--755 0 0")
            lines += _proto_lines(item, depth + 1)
            lines.append(f"{pad}$")
        else:
            lines.append(f"{pad}{item.name} ---644 1000 1000 {item}")
    return lines


def xfs(path: Path, tree: Path) -> None:
    """XFS (v5, CRCs on) from a protofile; 300 MiB, the least mkfs.xfs makes, sparse."""
    sparse_file(path, 300 * MiB)
    proto = path.with_suffix(".proto")
    proto.write_text("\n".join(["/dev/null", "0 0", "d--755 0 0", *_proto_lines(tree, 1), "$", ""]))
    sh("mkfs.xfs", "-q", "-f", "-p", proto, path)


def btrfs(path: Path, tree: Path) -> None:
    sparse_file(path, 128 * MiB)
    sh("mkfs.btrfs", "-q", "-f", "--rootdir", tree, path)


def vfat(path: Path, tree: Path, bits: int) -> None:
    """FAT12, FAT16 or FAT32 filled by mtools (no symlinks: FAT has none)."""
    size = {12: 2 * MiB, 16: 16 * MiB, 32: 40 * MiB}[bits]
    sparse_file(path, size)
    sh("mkfs.vfat", "-F", str(bits), "-n", f"FAT{bits}", path)
    env_dir = path.parent / f"fat{bits}-src"
    shutil.copytree(tree, env_dir, symlinks=True)
    for link in [p for p in env_dir.rglob("*") if p.is_symlink()]:
        link.unlink()
    (env_dir / "big.bin").write_bytes(content(100 * KiB if bits == 12 else 300 * KiB))
    for item in sorted(env_dir.iterdir()):
        sh("mcopy", "-s", "-i", path, item, f"::/{item.name}")


def exfat(path: Path, tree: Path) -> None:
    """exFAT, empty: no tool fills one without a mount."""
    sparse_file(path, 8 * MiB)
    sh("mkfs.exfat", "-L", "EXF", path)


def ntfs(path: Path, tree: Path) -> None:
    """NTFS with files copied in by ntfscp (in its root: ntfscp makes no directories)."""
    sparse_file(path, 16 * MiB)
    sh("mkntfs", "-q", "-F", "-Q", "-L", "NTFSSEED", path)
    for item in sorted(p for p in tree.iterdir() if p.is_file() and not p.is_symlink()):
        sh("ntfscp", "-q", path, item, item.name)
    for item in sorted((tree / "many").iterdir())[:40]:
        sh("ntfscp", "-q", path, item, item.name)


def _place(disk: Path, image: Path, offset: int) -> None:
    """Write a filesystem image into a disk image at ``offset``, keeping holes."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        zero = bytes(MiB)
        while chunk := src.read(MiB):
            if chunk != zero[: len(chunk)]:
                dst.seek(offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def gpt(path: Path, tree: Path) -> None:
    """A GPT disk: p1 ext4, p2 FAT16 (sgdisk numbering)."""
    sparse_file(path, 32 * MiB)
    sh("sgdisk", "-n", "1:2048:+8M", "-t", "1:8300", "-n", "2:0:+16M", "-t", "2:0700", path)
    part1, part2 = path.with_suffix(".p1"), path.with_suffix(".p2")
    ext4(part1, tree)
    vfat(part2, tree, 16)
    _place(path, part1, 2048 * SECTOR)
    _place(path, part2, (2048 + 8 * 2048) * SECTOR)


def mbr(path: Path, tree: Path) -> None:
    """An MBR disk with one primary (ext4) and an extended partition holding two logicals (FAT12, ext2)."""
    sparse_file(path, 32 * MiB)
    layout = "label: dos\nstart=2048, size=16384, type=83\nstart=18432, type=5\n" \
             "start=20480, size=4096, type=6\nstart=26624, size=16384, type=83\n"
    proc = subprocess.run(["sfdisk", "-q", str(path)], input=layout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sfdisk: {proc.stderr}")
    p1, p5, p6 = path.with_suffix(".p1"), path.with_suffix(".p5"), path.with_suffix(".p6")
    ext4(p1, tree)
    vfat(p5, tree, 12)
    ext2(p6, tree)
    _place(path, p1, 2048 * SECTOR)
    _place(path, p5, 20480 * SECTOR)
    _place(path, p6, 26624 * SECTOR)


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "ext4": ext4,
    "ext4-nocsum": lambda p, t: ext4(p, t, "^metadata_csum,^64bit"),
    "ext2": ext2,
    "xfs": xfs,
    "btrfs": btrfs,
    "fat12": lambda p, t: vfat(p, t, 12),
    "fat16": lambda p, t: vfat(p, t, 16),
    "fat32": lambda p, t: vfat(p, t, 32),
    "exfat": exfat,
    "ntfs": ntfs,
    "gpt": gpt,
    "mbr": mbr,
}


def _fill_mounted(mount: list[str], mnt: Path, tree: Path, symlinks: bool) -> None:
    """Mount (FUSE), copy the tree in, unmount: in finally, whatever fails."""
    mnt.mkdir()
    sh(*mount, mnt)
    try:
        for item in sorted(tree.iterdir()):
            if item.is_symlink() and not symlinks:
                continue
            sh("cp", "-a" if symlinks else "-r", item, mnt / item.name)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True)


def ntfs_mounted(path: Path, tree: Path) -> None:
    """NTFS holding the whole tree (directories, symlinks as reparse points or
    Interix links, a hard link), filled through ntfs-3g: needs root and FUSE."""
    sparse_file(path, 16 * MiB)
    sh("mkntfs", "-q", "-F", "-Q", "-L", "NTFSFULL", path)
    _fill_mounted(["ntfs-3g", path], path.parent / "mnt", tree, symlinks=True)


def exfat_mounted(path: Path, tree: Path) -> None:
    """exFAT holding the tree (no symlinks), filled through a loop device and
    mount.exfat-fuse (which needs a block device): needs root and FUSE."""
    sparse_file(path, 8 * MiB)
    sh("mkfs.exfat", "-L", "EXFULL", path)
    loop = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True, check=True)
    device = loop.stdout.strip()
    try:
        _fill_mounted(["mount.exfat-fuse", device], path.parent / "mnt", tree, symlinks=False)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


# Seeds that mount to be filled: the bench builds them when run as root
# (tests would need the `mount` marker for them).
MOUNTED_BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "ntfs-full": ntfs_mounted,
    "exfat-full": exfat_mounted,
}


def build_seeds(workdir: Path, names: list[str] | None = None) -> list[SeedImage]:
    """The named seeds (all by default) under ``workdir``, built there unless
    already built: mkfs stamps UUIDs and times, so a case reproduces only
    on the very images it ran on."""
    tree = workdir / "tree"
    if not tree.exists():
        make_tree(tree)
    out = []
    for name in names or list(BUILDERS):
        seed_dir = workdir / name
        path = seed_dir / f"{name}.img"
        if not path.exists():
            shutil.rmtree(seed_dir, ignore_errors=True)
            seed_dir.mkdir()
            {**BUILDERS, **MOUNTED_BUILDERS}[name](path.with_suffix(".new"), tree)
            path.with_suffix(".new").rename(path)
        out.append(SeedImage(name, path, path.stat().st_size, metadata_sectors(path)))
    return out
