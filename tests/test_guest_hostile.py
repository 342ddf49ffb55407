"""Hostile guests, crafted by hand: each damage a parser could loop on, allocate for, or crash over.

Every case starts from a real image (tests/guest_images.py), changes the
few bytes that make it hostile, and goes through the public API
(GuestDisk.infos/volume/volumes_text, Volume.entry/listing/readlink/
xattrs/data/read_data). Each must end in GuestDamaged (or an absent
name, or a volume marked damaged with its reason) within TIME_BOUND
seconds and MEMORY_BOUND bytes of Python allocations, with nothing else
escaping.
"""

from __future__ import annotations

import mmap
import os
import re
import resource
import struct
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from engine.guest.disk import DAMAGED
from engine.guest.guestdisk import GuestDisk
from engine.guest.reader import GuestDamaged
from engine.guest.volume import Volume
from tests.guest_images import SeedImage, build_seeds
from tests.guest_walk import EXPECTED, BytesSource, walk

TIME_BOUND = 5.0
pytestmark = pytest.mark.timeout(120)  # a regression that hangs fails here rather than stopping the run
MEMORY_BOUND = 200 * 1024 * 1024
T = TypeVar("T")


def _address_space() -> int:
    """The bytes of address space this process holds now (VmSize)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    return kib * 1024


def bounded(fn: Callable[[], T]) -> T | BaseException:
    """Run ``fn``; fail unless it ends in bounds with a result or an expected refusal.

    Memory is bounded by capping the address space at what the process
    holds plus MEMORY_BOUND while ``fn`` runs: an allocation past it fails
    with MemoryError, which shows in the refusal it turns into (tracemalloc
    would see it too, but slows a deep recursion thirtyfold, and then the
    time measured is its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + MEMORY_BOUND, hard))
    started = time.monotonic()
    try:
        result: T | BaseException = fn()
    except EXPECTED as e:
        result = e
    except MemoryError:
        pytest.fail(f"needed more than {MEMORY_BOUND // (1024 * 1024)} MiB")
    finally:
        seconds = time.monotonic() - started
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert seconds < TIME_BOUND, f"took {seconds:.1f} s"
    assert "too much memory" not in str(result) and "MemoryError" not in str(result), result
    return result


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SeedImage]:
    names = ["ext4", "ext2", "xfs", "btrfs", "fat16", "exfat", "ntfs", "gpt", "mbr"]
    made = build_seeds(tmp_path_factory.mktemp("guest-seeds"), names)
    return {s.name: s for s in made}


def image(seed: SeedImage) -> bytearray:
    return bytearray(seed.path.read_bytes())


def volume_of(data: bytearray, name: str = "disk") -> Volume:
    return GuestDisk(BytesSource(data)).volume(name)


# ---- ext: where an inode is, from debugfs (the tool that made the image's sibling)


def ext_inode_offset(seed: SeedImage, path: str) -> int:
    """Byte offset of a file's inode in an ext image."""
    out = subprocess.run(["debugfs", "-R", f"imap {path}", str(seed.path)], capture_output=True, text=True).stdout
    found = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", out)
    assert found, out
    block_size = 1024 << struct.unpack_from("<I", seed.path.read_bytes(), 1024 + 24)[0]
    return int(found.group(1)) * block_size + int(found.group(2), 16)


def ext_block_of(seed: SeedImage, path: str) -> int:
    """The first data block of a file or directory, from debugfs."""
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", str(seed.path)], capture_output=True, text=True).stdout
    return int(out.split()[0])


def set_size(data: bytearray, inode_at: int, size: int) -> None:
    struct.pack_into("<I", data, inode_at + 4, size & 0xFFFFFFFF)
    struct.pack_into("<I", data, inode_at + 108, size >> 32)


# ---- partition tables


def test_gpt_header_claiming_2_to_the_32_entries(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["gpt"])
    struct.pack_into("<I", data, 512 + 80, 0xFFFFFFFF)  # number of partition entries
    infos = bounded(lambda: GuestDisk(BytesSource(data)).infos())
    assert not isinstance(infos, BaseException)
    assert [i.name for i in infos] == ["p1", "p2"]  # the real entries, read from a bounded array


def test_mbr_whose_ebr_chain_loops(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["mbr"])
    extended_start = struct.unpack_from("<I", data, 446 + 16 + 8)[0]
    second_ebr = extended_start + struct.unpack_from("<I", data, extended_start * 512 + 446 + 16 + 8)[0]
    # the second EBR's "next" slot points back at itself
    struct.pack_into("<I", data, second_ebr * 512 + 446 + 16 + 8, second_ebr - extended_start)
    infos = bounded(lambda: GuestDisk(BytesSource(data)).infos())
    assert not isinstance(infos, BaseException)
    assert [i.name for i in infos] == ["p1", "p2", "p5", "p6"]


def test_partition_past_the_disk_end(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["mbr"])
    struct.pack_into("<I", data, 446 + 12, 0xFFFFFF00)  # p1's sector count
    disk = GuestDisk(BytesSource(data))
    infos = {i.name: i for i in bounded(disk.infos)}  # type: ignore[union-attr]
    assert infos["p1"].state == DAMAGED and "past the end" in infos["p1"].reason
    assert "p1" not in disk.readable() and "p6" in disk.readable()
    with pytest.raises(GuestDamaged):
        disk.volume("p1")
    assert "past the end" in disk.volumes_text()


# ---- ext


def test_ext_superblock_with_a_huge_block_size(seeds: dict[str, SeedImage]) -> None:
    """1024 << 2^32-1 is an integer of half a gigabyte: found by the fuzzer (mbr:105303)."""
    data = image(seeds["ext4"])
    struct.pack_into("<II", data, 1024 + 24, 0xFFFFFFFF, 0xFFFFFFFF)  # s_log_block_size, s_log_cluster_size
    infos = bounded(lambda: GuestDisk(BytesSource(data)).infos())
    assert not isinstance(infos, BaseException)
    assert infos[0].state == DAMAGED and "block size" in infos[0].reason


def test_ext4_directory_with_a_huge_size(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["ext4"])
    set_size(data, ext_inode_offset(seeds["ext4"], "/many"), 1 << 40)
    volume = volume_of(data)
    listing = bounded(lambda: volume.listing((b"many",)))
    assert isinstance(listing, (dict, GuestDamaged))
    if isinstance(listing, dict):  # the entries that are there, and no more
        assert len(listing) == 150


def test_ext2_block_mapped_file_claiming_a_terabyte(seeds: dict[str, SeedImage]) -> None:
    """dissect.extfs alone makes a list entry per block of i_size: gigabytes."""
    data = image(seeds["ext2"])
    set_size(data, ext_inode_offset(seeds["ext2"], "/big.bin"), 1 << 40)
    volume = volume_of(data)

    def read_end() -> bytes:
        found = volume.data((b"big.bin",))
        return volume.read_data(found, (1 << 40) - 4096, 4096)

    assert bounded(read_end) == bytes(4096)  # past the real blocks: a hole


def test_ext4_symlink_claiming_2_to_the_40_bytes(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["ext4"])
    set_size(data, ext_inode_offset(seeds["ext4"], "/long-link"), 1 << 40)
    volume = volume_of(data)
    refused = bounded(lambda: volume.readlink((b"long-link",)))
    assert isinstance(refused, GuestDamaged)
    assert str(refused).startswith("disk: long-link: "), refused  # the log line says where
    assert volume.readlink((b"short-link",)) == b"a/small.txt"  # the rest still reads


def _extent_index_block(target: int, fan_out: int, depth: int) -> bytes:
    """An extent index node of ``fan_out`` entries, all pointing at ``target``."""
    node = struct.pack("<HHHHI", 0xF30A, fan_out, fan_out, depth, 0)
    for i in range(fan_out):
        node += struct.pack("<IIHH", i, target, 0, 0)
    return node


@pytest.mark.parametrize("fan_out", [1, 340])
def test_ext4_extent_index_pointing_to_itself(seeds: dict[str, SeedImage], fan_out: int) -> None:
    """One index, or a full block of them, pointing back at their own block: a loop, and a
    tree of 340^5 paths in one block if only the depth is bounded."""
    seed = seeds["ext4"]
    data = image(seed)
    inode_at = ext_inode_offset(seed, "/big.bin")
    block = ext_block_of(seed, "/big.bin")  # reuse the file's first block for the looping node
    data[block * 4096 : block * 4096 + 4096] = _extent_index_block(block, fan_out, 5).ljust(4096, b"\0")
    data[inode_at + 40 : inode_at + 40 + 24] = _extent_index_block(block, 1, 5)
    volume = volume_of(data)
    assert isinstance(bounded(lambda: volume.data((b"big.bin",))), GuestDamaged)
    assert volume.entry((b"a", b"small.txt")).size == 10


def _rename_in_place(data: bytearray, old: bytes, new: bytes) -> None:
    at = data.find(old)
    assert at > 0 and len(new) == len(old), old
    data[at : at + len(old)] = new


def test_names_with_slash_nul_and_dotdot_are_left_out(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["ext2"])
    _rename_in_place(data, b"file-with-a-long-name-0001.txt", b"file-with-a-long/../../etc.txt")
    _rename_in_place(data, b"file-with-a-long-name-0002.txt", b"file-with-a-long-nam\x00-0002.txt")
    at = data.find(b"file-with-a-long-name-0003.txt")
    data[at - 2] = 2  # name_len: the name becomes ".."
    data[at : at + 2] = b".."
    volume = volume_of(data)
    listing = bounded(lambda: volume.listing((b"many",)))
    assert isinstance(listing, dict)
    assert len(listing) == 147
    assert not [n for n in listing if b"/" in n or b"\0" in n or n in (b".", b"..")]
    with pytest.raises(FileNotFoundError):
        volume.entry((b"many", b".."))


def test_directory_listing_itself_as_a_child(seeds: dict[str, SeedImage]) -> None:
    """a/b/c made a/b itself: paths go as deep as a caller walks, each step one bounded listing."""
    seed = seeds["ext2"]
    data = image(seed)
    b_inode = int(re.search(rb"(\d+)", subprocess.run(
        ["debugfs", "-R", "stat /a/b", str(seed.path)], capture_output=True).stdout.split(b"Inode:")[1]).group(1))
    block = ext_block_of(seed, "/a/b")
    at = data.find(b"c", block * 1024, block * 1024 + 1024)  # the entry "c": inode(4) rec_len(2) len(1) type(1) "c"
    while data[at - 2] != 1:  # name_len 1: the entry named "c", not a "c" inside a field
        at = data.find(b"c", at + 1, block * 1024 + 1024)
    struct.pack_into("<I", data, at - 8, b_inode)
    volume = volume_of(data)
    deep = (b"a", b"b") + (b"c",) * 60
    entry = bounded(lambda: volume.entry(deep))
    assert not isinstance(entry, BaseException) and entry.is_dir
    step = bounded(lambda: volume.listing(deep))
    assert isinstance(step, dict) and b"c" in step
    assert walk(BytesSource(data)).entries > 0  # a bounded walk of the loop ends


# ---- FAT and exFAT


def _fat16_geometry(data: bytearray) -> tuple[int, int, int, int]:
    """(first FAT byte offset, bytes per cluster, first data byte, root dir byte) of a FAT16 image."""
    sector, per_cluster, reserved, fats, root_entries, _, _, fat_sectors = struct.unpack_from("<HBHBHHBH", data, 11)
    fat = reserved * sector
    root = fat + fats * fat_sectors * sector
    return fat, per_cluster * sector, root + root_entries * 32, root


def test_fat_chain_that_loops(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["fat16"])
    fat, cluster_bytes, _, root = _fat16_geometry(data)
    entry = data.find(b"BIG     BIN", root)
    first = struct.unpack_from("<H", data, entry + 26)[0]
    struct.pack_into("<H", data, fat + 2 * (first + 3), first + 3)  # the 4th cluster points at itself
    volume = volume_of(data)

    def read_all() -> bytes:
        found = volume.data((b"big.bin",))
        return volume.read_data(found, 0, found.size)

    assert isinstance(bounded(read_all), GuestDamaged)


def test_fat_directory_chain_that_loops(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["fat16"])
    fat, _, _, root = _fat16_geometry(data)
    entry = data.find(b"MANY       ", root)
    first = struct.unpack_from("<H", data, entry + 26)[0]
    struct.pack_into("<H", data, fat + 2 * first, first)
    volume = volume_of(data)
    result = bounded(lambda: volume.listing((b"many",)))
    assert isinstance(result, (GuestDamaged, dict))


def test_exfat_chain_that_loops(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["exfat"])
    fat_offset, _, _, _, root_cluster = struct.unpack_from("<IIIII", data, 80)
    sector_shift = data[108]
    fat = fat_offset << sector_shift
    struct.pack_into("<I", data, fat + 4 * root_cluster, root_cluster)  # the root directory's chain loops
    disk = GuestDisk(BytesSource(data))
    infos = bounded(disk.infos)
    assert not isinstance(infos, BaseException)
    assert infos[0].state == DAMAGED and "loops" in infos[0].reason
    with pytest.raises(GuestDamaged):
        disk.volume("disk")


# ---- NTFS


def _mft_record(data: bytearray, number: int) -> int:
    """Byte offset of MFT record ``number`` (records of 1 KiB, as mkntfs makes them)."""
    sector, per_cluster = struct.unpack_from("<HB", data, 11)
    mft_cluster = struct.unpack_from("<Q", data, 0x30)[0]
    return mft_cluster * sector * per_cluster + number * 1024


def test_ntfs_root_record_damaged(seeds: dict[str, SeedImage]) -> None:
    data = image(seeds["ntfs"])
    root = _mft_record(data, 5)
    assert data[root : root + 4] == b"FILE"
    data[root : root + 4] = b"BAAD"
    disk = GuestDisk(BytesSource(data))
    infos = bounded(disk.infos)
    assert not isinstance(infos, BaseException) and infos[0].state == DAMAGED


@pytest.mark.parametrize("length", [0, 8, 0xFFFFFFF0])
def test_ntfs_attribute_length_crafted(seeds: dict[str, SeedImage], length: int) -> None:
    """A user file's first attribute with a length of 0 (a loop in a naive walk), too short, or huge."""
    data = image(seeds["ntfs"])
    record = data.find(b"FILE", _mft_record(data, 24))  # the first file ntfscp wrote
    first_attribute = struct.unpack_from("<H", data, record + 0x14)[0]
    struct.pack_into("<I", data, record + first_attribute + 4, length)
    result = bounded(lambda: walk(BytesSource(data)))
    assert not isinstance(result, BaseException)


def test_every_case_leaves_the_undamaged_seed_clean(seeds: dict[str, SeedImage]) -> None:
    """The cases above fail for their damage, not for what the seeds hold."""
    for seed in seeds.values():
        with open(seed.path, "rb") as f:
            source = BytesSource(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        result = bounded(lambda: walk(source))
        assert not isinstance(result, BaseException)
        assert result.outcome == "clean", (seed.name, result.refusals)


# ---- Btrfs


def _btrfs_nodes(data: bytearray, owner: int) -> list[int]:
    """Byte offsets of the B-tree nodes of one tree (by owner id) in a Btrfs image."""
    fsid = bytes(data[65536 + 32 : 65536 + 48])
    node_size = struct.unpack_from("<I", data, 65536 + 148)[0]
    return [at for at in range(0, len(data), node_size)
            if data[at + 32 : at + 48] == fsid and struct.unpack_from("<Q", data, at + 88)[0] == owner]


@pytest.mark.parametrize("damage", ["empty", "self"])
def test_btrfs_node_empty_or_pointing_to_itself(seeds: dict[str, SeedImage], damage: str) -> None:
    """An empty node spun dissect's binary search for ever; a node pointing at
    itself was walked from its cache for ever; neither reads anything a budget counts."""
    data = image(seeds["btrfs"])
    nodes = _btrfs_nodes(data, 5)  # the default subvolume's tree
    assert nodes
    for at in nodes:
        if damage == "empty":
            struct.pack_into("<I", data, at + 96, 0)
        else:  # a node of level 1 whose one pointer is its own address
            struct.pack_into("<IB", data, at + 96, 1, 1)
            struct.pack_into("<Q", data, at + 101 + 17, struct.unpack_from("<Q", data, at + 48)[0])
    result = bounded(lambda: walk(BytesSource(data)))
    assert not isinstance(result, BaseException) and result.outcome == "damaged"


# ---- XFS


def test_xfs_extent_btree_pointing_to_itself(seeds: dict[str, SeedImage]) -> None:
    """big.bin's data fork made a B+tree whose one node lists itself 251 times."""
    seed = seeds["xfs"]
    out = subprocess.run(["xfs_db", "-r", "-c", "path /big.bin", "-c", "stack", "-c", "print u3.bmx", str(seed.path)],
                         capture_output=True, text=True).stdout
    inode_at = int(re.search(r"byte offset (\d+)", out).group(1))  # type: ignore[union-attr]
    block = int(re.search(r"0:\[0,(\d+),", out).group(1))  # type: ignore[union-attr]  (AG 0: fsbno = block)
    maxrecs = (512 - 176 - 4) // 16  # the inode's data fork as a B+tree root
    root = struct.pack(">HH", 1, 1) + bytes(8 * maxrecs) + struct.pack(">Q", block)
    node_recs = (4096 - 72) // 16
    node = struct.pack(">IHH", 0x424D4133, 1, node_recs).ljust(72, b"\0") + bytes(8 * node_recs)
    node += struct.pack(f">{node_recs}Q", *[block] * node_recs)
    patches = {inode_at + 5: bytes([3]), inode_at + 176: root, block * 4096: node}  # di_format 3: btree
    with open(seed.path, "rb") as f:
        source = BytesSource(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), patches)
        volume = GuestDisk(source).volume("disk")
        refused = bounded(lambda: volume.data((b"big.bin",)))
        assert isinstance(refused, GuestDamaged) and "nest without end" in str(refused), refused
        assert volume.entry((b"a", b"small.txt")).size == 10


@pytest.mark.parametrize("name", ["ext4", "ext2"])
def test_bounded_ext_runlists_read_what_was_put_in(seeds: dict[str, SeedImage], name: str) -> None:
    """engine/guest/ext_runs.py replaces dissect's runlists: extents (ext4) and
    block maps with indirect blocks (ext2, 1 KiB blocks), holes included, read right."""
    seed = seeds[name]
    tree = seed.path.parent.parent / "tree"
    volume = volume_of(image(seed))
    checked = 0
    for path in sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()):
        parts = tuple(os.fsencode(x) for x in path.relative_to(tree).parts)
        data = volume.data(parts)
        assert volume.read_data(data, 0, data.size) == path.read_bytes(), path
        checked += 1
    assert checked > 150


def test_a_refused_directory_is_not_parsed_again(seeds: dict[str, SeedImage]) -> None:
    """A crafted directory may cost a whole request's budget (seconds): a second
    lookup in it gets the same refusal without the parser walking it again."""
    seed = seeds["ext4"]
    data = image(seed)
    inode_at = ext_inode_offset(seed, "/many")
    struct.pack_into("<H", data, inode_at + 40, 0)  # the extent header's magic
    volume = GuestDisk(BytesSource(data)).volume("disk")
    walked: list[object] = []
    children = volume.fs.children

    def counted(entry: object) -> object:
        walked.append(entry)
        return children(entry)  # type: ignore[arg-type]

    volume.fs.children = counted  # type: ignore[method-assign,assignment]
    with pytest.raises(GuestDamaged, match="extent"):
        volume.entry((b"many", b"file-with-a-long-name-0001.txt"))
    assert len(walked) == 2  # the root, then many
    with pytest.raises(GuestDamaged, match="extent"):
        volume.entry((b"many", b"file-with-a-long-name-0002.txt"))
    assert len(walked) == 2, "many was parsed again"
    assert volume.entry((b"a", b"small.txt")).size == 10
