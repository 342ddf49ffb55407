"""Memory is bounded by what an image or a file really holds (SPEC §7).

Every command here runs under an address-space limit (RLIMIT_AS), so that
a regression shows as a failure (MemoryError, a refusal it should not
make) rather than as a machine swapping. The files are small and claim a
lot: millions of L2 entries naming one compressed cluster, a virtual size
of an exbibyte, a bitmap or checksum file whose header claims 2^50 bits.
"""

from __future__ import annotations

import resource
import struct
import subprocess
from pathlib import Path

import pytest
import xxhash

from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.oracle import qemu_img
from tests.memory_bombs import write_huge_header, write_mapped_image, write_zero_stripes

# What a CLI run may take: the interpreter with numpy and the rest needs a
# few hundred MB of address space; the 8.2 M-entry image below took 2.9 GB.
LIMIT = 1 << 30
CPU_SECONDS = 10  # each command here takes about 2 s of CPU
BOMB_TABLES = 1000  # 8,192,000 entries of 64 KiB clusters: a 500 GiB disk in a 63 MiB file


def limited(*args: str | Path, limit: int = LIMIT) -> subprocess.CompletedProcess:
    """`backupfs ARGS` under an address-space and a CPU-time limit; never a
    traceback, an internal error or a kill."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # And seconds of CPU: a step per entry of an 8.2 M-entry image took
        # 25 s of CPU (map) or 130 (check) where arrays take about 2.
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))

    cmd = backupfs_cmd() + [str(a) for a in args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=cap, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode} (over the limits?): {err}"
    assert "Traceback" not in err, err
    assert "MemoryError" not in err and "internal error" not in err and "out of memory" not in err, err
    return proc


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8.2 M compressed L2 entries, every one naming the same cluster of zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.qcow2"
    assert write_mapped_image(path, BOMB_TABLES) == BOMB_TABLES * 8192
    return path


def test_the_compressed_entry_bomb_is_a_valid_image_to_qemu(bomb: Path) -> None:
    """The oracle: QEMU opens it and finds nothing wrong (refcounts are exact)."""
    assert "virtual size: 500 GiB" in qemu_img("info", bomb)
    assert "No errors were found" in qemu_img("check", bomb)


def test_image_info_of_the_compressed_entry_bomb_fits_in_the_limit(bomb: Path) -> None:
    proc = limited("image", "info", bomb)
    assert proc.returncode == 0
    out = proc.stdout.decode()
    assert "compressed clusters: 8192000" in out
    assert "stored: 500 GiB data" in out


def test_image_check_of_the_compressed_entry_bomb_fits_in_the_limit(bomb: Path) -> None:
    """As QEMU's check: no errors (one cluster referenced 8.2 M times, and
    its 64-bit refcount says so), counted without a step per entry."""
    proc = limited("image", "check", bomb)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "No errors were found" in out
    assert "8192000/8192000 = 100.00% allocated" in out


def test_image_map_of_the_compressed_entry_bomb_fits_in_the_limit(bomb: Path) -> None:
    proc = limited("image", "map", bomb)
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 0
    assert len(lines) == 1 and '"length": 536870912000' in lines[0] and '"compressed": true' in lines[0]


def test_import_of_a_million_extent_image_fits_in_the_limit(tmp_path: Path) -> None:
    """Every other cluster a zero cluster: 8.2 M extents, nothing to copy."""
    image = tmp_path / "stripes.qcow2"
    write_zero_stripes(image, BOMB_TABLES)
    repo = tmp_path / "repo"
    cli("init", repo)
    proc = limited("import", repo, "stripes", image)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "imported from stripes.qcow2" in proc.stdout.decode()


def test_an_exbibyte_import_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    image = tmp_path / "huge.qcow2"
    write_huge_header(image, 1 << 60)
    assert "virtual size: 1 EiB" in qemu_img("info", image)
    repo = tmp_path / "repo"
    cli("init", repo)
    proc = limited("import", repo, "huge", image)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and str(image) in err and "larger than backupfs tracks (at most 8 PiB" in err
    assert "huge" not in cli("list", repo).stdout.decode()
    assert not (repo / "devices" / "huge").exists()


def test_a_granularity_whose_checksums_exceed_the_limit_is_refused_with_one_that_fits(tmp_path: Path) -> None:
    """1 TiB at 512 B is 2^31 granules (16 GiB of checksums a backup): the
    smallest granularity that fits 2^27 granules is 8 KiB."""
    source = tmp_path / "big.img"
    with open(source, "wb") as f:
        f.truncate(1 << 40)  # sparse
    repo = tmp_path / "repo"
    cli("init", repo)
    proc = limited("device", "add", "--granularity", "512", repo, "big", source)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and str(source) in err and "use --granularity 8KiB or larger" in err
    assert "big" not in cli("device", "list", repo).stdout.decode()
    proc = limited("device", "add", "--granularity", "4K", repo, "big", source)
    assert proc.returncode == 1 and "use --granularity 8KiB" in proc.stderr.decode()
    limited("device", "add", "--granularity", "8KiB", repo, "big", source)
    assert "big" in cli("device", "list", repo).stdout.decode()


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path]:
    """A repository with one device of 1 MiB and one full backup of it."""
    source = tmp_path / "disk.img"
    source.write_bytes(b"x" * (1 << 20))
    return repo_with_a_full(tmp_path / "repo", "d", source), source


def _bitmap_file(granularity: int, size: int, payload: bytes) -> bytes:
    """A bitmap file as engine/bitmap.py writes one, with a valid checksum."""
    head = struct.pack("<8sIIQQqQQQ", b"BFSBITM1", 0, granularity, size, size, 0, 0, 0, len(payload))
    body = head + payload
    return body + xxhash.xxh3_64_digest(body)


def _sc_claiming(bits: int) -> bytes:
    """An sc_encode stream of ``bits`` clear bits: its header, then the end marker."""
    width = (bits.bit_length() + 7) // 8
    return bytes([width]) + bits.to_bytes(width, "little") + b"\0"


@pytest.mark.parametrize("granularity,size,claimed", [
    (512, 512 << 50, 1 << 50),  # the header's geometry itself claims 2^50 granules
    (64 * 1024, 1 << 20, 1 << 50),  # the device's geometry, and a payload claiming 2^50 bits
])
def test_a_bitmap_file_claiming_2_50_bits_is_damaged_and_untrusted(
    backed_up: tuple[Path, Path], granularity: int, size: int, claimed: int
) -> None:
    repo, _source = backed_up
    bitmap = repo / "devices" / "d" / "since-last.bitmap"
    assert bitmap.exists()
    bitmap.write_bytes(_bitmap_file(granularity, size, _sc_claiming(claimed)))
    proc = limited("status", repo)
    out = proc.stdout.decode()
    assert "bitmap: untrusted (its bitmap is unreadable" in out and "bitmap is damaged" in out, out
    # A backup does not trust it either: it compares checksums (a scan).
    proc = limited("backup", repo, "d", "incremental")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "bitmap: trusted" in limited("status", repo).stdout.decode()


def test_a_checksum_file_claiming_2_36_granules_is_damaged_not_allocated(backed_up: tuple[Path, Path]) -> None:
    """A .sums header of 2^36 granules of 512 B (within the old sanity bound)
    and a bitmap stream claiming them: decoding would allocate 8 GiB."""
    repo, _source = backed_up
    (sums,) = (repo / "devices" / "d").glob("*.sums")
    granules = 1 << 36
    encoded = _sc_claiming(granules)
    head = struct.pack("<8sIQQQ", b"BFSSUMS1", 512, granules * 512, 0, len(encoded)) + encoded
    sums.write_bytes(head + xxhash.xxh3_64_digest(head))
    proc = limited("verify", repo, "d")
    text = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 1
    assert sums.name in text and "checksum file is damaged" in text, text


def test_running_out_of_memory_is_one_line_naming_the_command(bomb: Path) -> None:
    """The last resort, when a limit lower than the image needs is set:
    one line and exit 1, not an internal error."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (500 << 20, 500 << 20))

    proc = subprocess.run(backupfs_cmd() + ["image", "info", str(bomb)], capture_output=True,
                          preexec_fn=cap, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err == "backupfs: error: out of memory while running 'backupfs image info' " \
                  "(set BACKUPFS_DEBUG=1 for details)\n"
