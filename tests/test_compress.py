"""Compressed backups (zstd clusters), with QEMU as the oracle.

Every image: `qemu-img check` clean, `qemu-img compare` identical to the
device at trigger time, `qemu-img info` says zstd, and `qemu-img check`
and `qemu-img map` say which clusters QEMU reads as compressed (QEMU 7.2's
map has no "compressed" field: a compressed cluster is data without a
host offset).
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from engine.catalog import Catalog
from engine.ccache import CACHE_BYTES
from engine.errors import UsageError
from engine.qcow2.compress import worth_it
from engine.repo import Repository
from backupfs.trigger import TriggerCommand, TriggerError, parse_trigger

from tests.commands import cli
from tests.oracle import qemu_check, qemu_compare, qemu_img, qemu_map
from tests.test_engine_backup import HookedSource, Snapshots

KiB = 1024
MiB = 1024 * KiB


def compressible(rng: random.Random, n: int) -> bytes:
    """Text-like bytes: compress well, but are not one repeated byte.

    Pieces of a small vocabulary text at random places: cheap to make (the
    quick run has no time for a word-by-word loop over megabytes).
    """
    words = [b"backup", b"cluster", b"qcow2", b"zstd", b"device", b"granule", b"chain", b"\n"]
    vocab = b" ".join(rng.choice(words) + str(rng.randrange(1000)).encode() for _ in range(4000))
    pieces = []
    while sum(map(len, pieces)) < n:
        at = rng.randrange(len(vocab) - 4096)
        pieces.append(vocab[at : at + rng.randrange(512, 4096)])
    return b"".join(pieces)[:n]


def make_mixed_source(path: Path, size: int, seed: int) -> Path:
    """Text, random (incompressible) and zero regions, at odd offsets."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // (1 * MiB) + 2):
            off = rng.randrange(0, size - 1 * MiB) // 512 * 512
            n = rng.randrange(512, 1 * MiB)
            f.seek(off)
            f.write(rng.randbytes(n) if i % 3 == 0 else compressible(rng, n))
    return path


def scribble(path: Path, seed: int, size: int, dev_write=None) -> None:
    """Change a few places: some text, some random bytes."""
    rng = random.Random(seed)
    for i in range(6):
        off = rng.randrange(0, size - 300 * KiB)
        data = rng.randbytes(rng.randrange(1, 300 * KiB)) if i % 2 else compressible(rng, rng.randrange(1, 300 * KiB))
        if dev_write is not None:
            dev_write(off, data)
        else:
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(data)


def compressed_share(image: str | os.PathLike[str]) -> float:
    """QEMU's count of compressed clusters, in percent of the allocated ones."""
    text = qemu_check(image)
    m = re.search(r"([\d.]+)% compressed clusters", text)
    assert m, text
    return float(m.group(1))


def assert_zstd_image(image: str | os.PathLike[str], snap: Path, *, compressed: bool = True) -> None:
    """check clean, compare identical, zstd in the header, and compressed
    clusters both QEMU's check and its map can see (or none)."""
    qemu_check(image)
    qemu_compare(image, snap)
    info = json.loads(qemu_img("info", "--output=json", str(image)))
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    share = compressed_share(image)
    # Map entries of this image (depth 0) that hold data without a host offset: compressed.
    mapped = [e for e in qemu_map(image) if e["depth"] == 0 and e["data"]]
    no_offset = [e for e in mapped if "offset" not in e]
    if compressed:
        assert share > 0 and no_offset, (share, mapped[:5])
    else:
        assert share == 0 and not no_offset


@pytest.fixture
def repo(tmp_path: Path):
    Repository.init(str(tmp_path / "repo"))
    r = Repository.open(str(tmp_path / "repo"))
    try:
        yield r
    finally:
        r.close()


# -- the images --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cluster, granularity",
    [
        (4 * KiB, 64 * KiB),
        (64 * KiB, 256 * KiB),  # granularity > cluster: copy clusters of 256K
        # The quick run is near its limit: these in the long one.
        pytest.param(64 * KiB, 64 * KiB, marks=pytest.mark.long),
        pytest.param(2 * MiB, 64 * KiB, marks=pytest.mark.long),
        pytest.param(1 * KiB, 4 * KiB, marks=pytest.mark.long),
    ],
)
def test_full_incremental_differential_compressed(cluster: int, granularity: int, repo: Repository,
                                                  tmp_path: Path) -> None:
    size = 8 * MiB + 4 * KiB  # a short last cluster for most cluster sizes
    src = make_mixed_source(tmp_path / "src.img", size, seed=cluster)
    repo.add_device("d", str(src), granularity, compress="zstd")
    snaps = Snapshots(src, tmp_path)
    ids = []
    for n, kind in enumerate(("full", "incremental", "differential", "incremental")):
        if n:
            scribble(src, n, size)
        snap = snaps.take()
        res = repo.backup("d", kind, cluster_size=cluster)
        image = repo.image_path(res.record)
        assert_zstd_image(image, snap)
        ids.append(res.record.id)
        # Stored bytes really shrink: the frames, not the clusters they hold.
        assert res.record.stored_bytes < res.bytes_written
        assert os.path.getsize(image) < res.bytes_written + 4 * cluster + 2 * MiB
        # Our own reader agrees with QEMU's, through the whole chain.
        with repo.chain(res.record.id) as view:
            out = bytearray(size)
            view.readinto(0, memoryview(out))
        assert out == snap.read_bytes()
    report = repo.verify("d")
    assert report.ok, report.problems


def test_incompressible_clusters_are_stored_plain(repo: Repository, tmp_path: Path) -> None:
    size = 8 * MiB
    src = tmp_path / "src.img"
    rng = random.Random(3)
    src.write_bytes(rng.randbytes(4 * MiB) + compressible(rng, 4 * MiB))
    repo.add_device("r", str(src), None, compress="zstd")
    res = repo.backup("r", "full")
    image = repo.image_path(res.record)
    qemu_check(image)
    qemu_compare(image, src)
    mapped = [e for e in qemu_map(image) if e["data"]]
    # The random half: plain clusters at host offsets; the text half: compressed.
    plain = sum(e["length"] for e in mapped if "offset" in e)
    packed = sum(e["length"] for e in mapped if "offset" not in e)
    assert plain == 4 * MiB and packed == 4 * MiB, mapped
    assert res.record.stored_bytes < 4 * MiB + 4 * MiB // 2


def test_writer_small_writes_in_any_order_and_each_cluster_once(tmp_path: Path) -> None:
    """Single-cluster writes out of order (as copy-before-write makes them),
    zeroes among them, a short last cluster: QEMU reads what was written."""
    from engine.qcow2.writer import Qcow2Writer

    cs = 4 * KiB
    size = 3 * MiB + 512
    rng = random.Random(8)
    disk = bytearray(size)
    image = tmp_path / "w.qcow2"
    text = compressible(rng, size)
    with Qcow2Writer(str(image), size, cs, compress="zstd") as w:
        order = list(range(-(-size // cs)))
        rng.shuffle(order)
        for c in order:
            n = min(cs, size - c * cs)
            if c % 7 == 0:
                w.write_zeroes(c * cs, n)
                continue
            data = rng.randbytes(n) if c % 5 == 0 else text[c * cs : c * cs + n]
            disk[c * cs : c * cs + n] = data
            w.write(c * cs, data)
        with pytest.raises(ValueError, match="written once per cluster"):
            w.write(cs, bytes(cs))  # still pending: drained first, then refused
        w.commit()
    raw = tmp_path / "w.raw"
    raw.write_bytes(disk)
    qemu_check(image)
    qemu_compare(image, raw)
    assert compressed_share(image) > 50


def test_worth_it_saves_an_eighth_and_a_sector() -> None:
    assert worth_it(64 * KiB) == 56 * KiB
    assert worth_it(4 * KiB) == 3584
    assert worth_it(512) == 0  # nothing to save in one sector


def test_mixed_chain_plain_full_compressed_incremental(repo: Repository, tmp_path: Path) -> None:
    """A device without a default, one compressed incremental asked for, then plain again."""
    size = 16 * MiB
    src = make_mixed_source(tmp_path / "src.img", size, seed=9)
    repo.add_device("m", str(src), None)
    snaps = Snapshots(src, tmp_path)
    full = repo.backup("m", "full")
    qemu_check(repo.image_path(full.record))
    assert json.loads(qemu_img("info", "--output=json", repo.image_path(full.record)))[
        "format-specific"]["data"]["compression-type"] == "zlib"  # QEMU's name for "no type set"
    scribble(src, 1, size)
    snap = snaps.take()
    inc = repo.backup("m", "incremental", compress="zstd")
    assert_zstd_image(repo.image_path(inc.record), snap)
    scribble(src, 2, size)
    snap2 = snaps.take()
    inc2 = repo.backup("m", "incremental", compress="none")
    qemu_check(repo.image_path(inc2.record))
    qemu_compare(repo.image_path(inc2.record), snap2)
    assert compressed_share(repo.image_path(inc2.record)) == 0
    scribble(src, 3, size)
    snap3 = snaps.take()
    scanned = repo.backup("m", "incremental", compress="zstd", scan=True)  # checksums, not the bitmap
    assert scanned.scanned
    assert_zstd_image(repo.image_path(scanned.record), snap3)
    assert repo.verify("m").ok
    out = tmp_path / "restored.raw"
    repo.restore("m", inc.record.id, str(out))
    assert out.read_bytes() == snap.read_bytes()


def test_prune_merges_compressed_backups_into_a_compressed_image(repo: Repository, tmp_path: Path) -> None:
    size = 8 * MiB
    src = make_mixed_source(tmp_path / "src.img", size, seed=17)
    repo.add_device("p", str(src), None, compress="zstd")
    full = repo.backup("p", "full").record
    scribble(src, 3, size)
    snap = Snapshots(src, tmp_path).take()
    inc = repo.backup("p", "incremental").record
    repo.prune("p", remove=full.id)  # the full's clusters merged into the incremental, now the chain's full
    (merged,) = repo.backups("p")
    assert merged.id == inc.id and merged.parent is None
    assert_zstd_image(repo.image_path(merged), snap)
    assert merged.stored_bytes < size // 2
    assert repo.verify("p").ok


def test_copy_before_write_under_a_compressed_job(repo: Repository, tmp_path: Path) -> None:
    """Writes to the device while a compressed full copies it: the backup is
    the trigger-time disk, and the writes are in the next incremental."""
    size = 32 * MiB
    src = make_mixed_source(tmp_path / "src.img", size, seed=21)
    repo.add_device("c", str(src), None, compress="zstd")
    dev = repo.device("c")
    rng = random.Random(21)
    snaps = Snapshots(src, tmp_path)
    during: list[int] = []

    def hook(n: int, offset: int, length: int) -> None:
        def writer() -> None:
            for _ in range(6):
                off = rng.randrange(0, size - 100 * KiB) // 512 * 512
                if offset - 100 * KiB <= off < offset + length:
                    continue  # the main loop holds those clusters
                dev.write(off, compressible(rng, rng.choice([512, 4096, 100 * KiB])))
                during.append(off)

        t = threading.Thread(target=writer)
        t.start()
        t.join()

    snap = snaps.take()
    res = repo.backup("c", "full", chunk_bytes=2 * MiB, source_factory=lambda d: HookedSource(d, hook))
    assert during and res.cbw_units > 0
    assert_zstd_image(repo.image_path(res.record), snap)
    inc = repo.backup("c", "incremental")
    assert_zstd_image(repo.image_path(inc.record), snaps.take())


# -- settings: the device's default, the trigger, the CLI ------------------------------------


def test_device_default_is_stored_changed_and_overridden(repo: Repository, tmp_path: Path) -> None:
    src = make_mixed_source(tmp_path / "src.img", 8 * MiB, seed=4)
    assert repo.add_device("a", str(src), None).compress == "none"
    assert repo.set_device("a", compress="zstd").compress == "zstd"
    assert repo.device_record("a").compress == "zstd"
    res = repo.backup("a", "full")
    assert compressed_share(repo.image_path(res.record)) > 0
    res = repo.backup("a", "full", compress="none")  # the backup's word wins
    assert compressed_share(repo.image_path(res.record)) == 0
    with pytest.raises(UsageError, match="unknown compression 'lz4'"):
        repo.set_device("a", compress="lz4")
    with pytest.raises(UsageError, match="no device named"):
        repo.set_device("nope", compress="zstd")


def test_a_catalog_from_before_compression_reads_none(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    src = make_mixed_source(tmp_path / "src.img", 4 * MiB, seed=5)
    Repository.init(str(path))
    with Repository.open(str(path)) as r:
        r.add_device("old", str(src), None)
    db = path / "catalog.db"
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE devices DROP COLUMN compress")
    cat = Catalog.open(str(db), readonly=True)  # a reader beside a mount: no column, reads "none"
    try:
        assert cat.device("old").compress == "none"
    finally:
        cat.close()
    with Repository.open(str(path)) as r:  # the writer adds it back
        assert r.device_record("old").compress == "none"
        r.set_device("old", compress="zstd")
    with Repository.open(str(path)) as r:
        assert r.device_record("old").compress == "zstd"


def test_trigger_compress_key() -> None:
    cmd = parse_trigger(b"full compress=zstd\n")
    assert cmd == TriggerCommand("full", compress="zstd")
    assert parse_trigger(cmd.line().encode()) == cmd
    assert parse_trigger(b"incremental compress=none").compress == "none"
    assert parse_trigger(b"incremental").compress is None  # the device's default
    with pytest.raises(TriggerError, match="compress='lz4' is not a compression"):
        parse_trigger(b"full compress=lz4")


def test_cli_device_add_set_list_and_backup(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = make_mixed_source(tmp_path / "src.img", 2 * MiB, seed=6)
    cli("init", repo)
    out = cli("device", "add", repo, "z", src, "--compress", "zstd").stdout.decode()
    assert "compress zstd" in out
    cli("device", "add", repo, "p", make_mixed_source(tmp_path / "p.img", 2 * MiB, seed=7))
    listed = json.loads(cli("device", "list", repo, "--json").stdout)
    assert {d["name"]: d["compress"] for d in listed} == {"p": "none", "z": "zstd"}
    out = cli("device", "set", repo, "p", "--compress", "zstd").stdout.decode()
    assert out.strip() == "device p: compress zstd (for its next backups)"
    out = cli("backup", repo, "p", "full").stdout.decode()
    assert "(zstd: " in out
    out = cli("backup", repo, "z", "full", "--compress", "none").stdout.decode()
    assert "zstd" not in out
    for name, compressed in (("p", True), ("z", False)):
        (image,) = (repo / "devices" / name).glob("*.qcow2")
        assert (compressed_share(image) > 0) == compressed, name


# -- reading compressed backups -----------------------------------------------------------------


def _compressed_image(tmp_path: Path, size: int = 8 * MiB) -> tuple[Path, bytes]:
    from engine.qcow2.writer import Qcow2Writer

    data = compressible(random.Random(41), size)
    image = tmp_path / "c.qcow2"
    with Qcow2Writer(str(image), size, 64 * KiB, compress="zstd") as w:
        w.write(0, data)
        w.commit()
    return image, data


def test_sequential_reads_are_decompressed_ahead_random_ones_not(tmp_path: Path) -> None:
    from engine.chain import ChainView

    image, data = _compressed_image(tmp_path)
    with ChainView.open(str(image)) as view:
        loads: list[str] = []
        load = view._ccache._load

        def counting(key: tuple[int, int]) -> bytes:
            loads.append(threading.current_thread().name)
            return load(key)

        view._ccache._load = counting
        # Random single reads: each decompresses what it asks for, in the reader.
        for off in (5 * MiB, 1 * MiB, 7 * MiB):
            assert bytes(view.read(off, 4096)) == data[off : off + 4096]
        assert loads == ["MainThread"] * 3
        # A sequential reader: the clusters ahead of it come from the workers.
        loads.clear()
        for off in range(0, len(data), 128 * KiB):
            assert bytes(view.read(off, 128 * KiB)) == data[off : off + 128 * KiB]
        ahead = sum(name.startswith("backupfs-unzstd") for name in loads)
        assert ahead >= len(loads) * 3 // 4, loads
        assert len(loads) <= len(data) // (64 * KiB) + 3  # none decompressed twice (3 were cached)
        assert view._ccache.memory_bytes() <= CACHE_BYTES  # 8 MiB read, 12 MiB kept at most
        # A second pass over the same view (a reader starting over): read ahead again.
        loads.clear()
        for off in range(0, len(data), 128 * KiB):
            assert bytes(view.read(off, 128 * KiB)) == data[off : off + 128 * KiB]
        ahead = sum(name.startswith("backupfs-unzstd") for name in loads)
        assert ahead >= len(loads) * 3 // 4, loads


def test_a_damaged_cluster_ahead_fails_the_read_that_reaches_it(tmp_path: Path) -> None:
    from engine.chain import ChainView
    from engine.errors import ImageError

    image, data = _compressed_image(tmp_path)
    with ChainView.open(str(image)) as view:
        i = view._starts.index(4 * MiB)  # the cluster at 4 MiB: its frame, overwritten
        coffset, csize = view.layers[0].compressed_span(view._hosts[i])
    with open(image, "r+b") as f:
        f.seek(coffset + 4)
        f.write(b"\xff" * 32)
    with ChainView.open(str(image)) as view:
        for off in range(0, 4 * MiB, 128 * KiB):  # the read-ahead passes over it, silently
            assert bytes(view.read(off, 128 * KiB)) == data[off : off + 128 * KiB]
        with pytest.raises(ImageError, match="compressed cluster at .* is corrupt|decompresses to"):
            view.read(4 * MiB, 128 * KiB)
