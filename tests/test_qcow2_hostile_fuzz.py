"""Random corruption of small valid images (hypothesis): opening, mapping,
reading and checking either works or raises ImageError, within a deadline
and a memory bound. HOSTILE_EXAMPLES sets how many examples each test runs."""

from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.chain import ChainView
from engine.errors import ImageError
from engine.qcow2.check import check_image
from engine.qcow2.format import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, parse_header
from engine.qcow2.info import describe_layer
from engine.qcow2.layers import Qcow2Layer

from tests.hostile_qcow2 import build, FIELDS, Img, open_and_read, V2_FIELDS
from tests.oracle import run

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Seed:
    """A small valid image (and its backing file) to corrupt."""

    name: str
    data: bytes = field(repr=False)
    cluster_size: int
    cluster_bits: int
    version: int
    # (start, end) ranges of the structures worth hitting.
    header: tuple[int, int]
    l1: tuple[int, int]
    l2: tuple[tuple[int, int], ...]
    refcounts: tuple[tuple[int, int], ...]
    compressed: tuple[tuple[int, int], ...]
    backing: tuple[str, bytes] | None = field(default=None, repr=False)


def _seed(name: str, path: Path, backing: Path | None = None) -> Seed:
    data = path.read_bytes()
    h = parse_header(str(path), data, len(data))
    cs = h.cluster_size
    img = Img(path)
    l2 = []
    for i in range(h.l1_size):
        off = img.l2_table(i)
        if off:
            l2.append((off, off + cs))
    refcounts = [(h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * cs)]
    reft = h.refcount_table_offset
    for i in range(h.refcount_table_clusters * cs // 8):
        off = img.get(">Q", reft + 8 * i) & ~0x1FF
        if off:
            refcounts.append((off, off + cs))
    compressed = []
    with Qcow2Layer(str(path)) as layer:
        for ext in layer.allocation():
            if ext.kind == 2:
                a, n = layer.compressed_span(ext.host)
                compressed.append((a, min(a + n, len(data))))
    assert compressed and l2, name
    return Seed(
        name=name,
        data=data,
        cluster_size=cs,
        cluster_bits=h.cluster_bits,
        version=h.version,
        header=(0, cs),
        l1=(h.l1_table_offset, h.l1_table_offset + h.l1_size * 8),
        l2=tuple(l2),
        refcounts=tuple(refcounts),
        compressed=tuple(compressed),
        backing=(backing.name, backing.read_bytes()) if backing else None,
    )


SEED_NAMES = ["v3-4k", "v3-512-backing", "v2-4k", "v3-16k-extl2-zstd", "v3-4k-snapshot-bitmap"]


class Seeds(dict[str, Seed]):
    """The seed images by name (short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return f"<seeds {sorted(self)}>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    """Five small images (7 to 100 KiB), each with data, zeros and a compressed cluster."""
    d = tmp_path_factory.mktemp("seeds")
    out = Seeds()
    out["v3-4k"] = _seed("v3-4k", build(d / "a.qcow2"))
    base = build(d / "base.qcow2", cluster=512, writes=("write -q -P 0x55 0 64k",))
    writes = ("write -q -P 0x11 0 1k", "write -q -z 2k 1k", "write -q -c -P 0x22 40k 1k")
    tip = build(d / "tip.qcow2", cluster=512, backing="base.qcow2", writes=writes)
    out["v3-512-backing"] = _seed("v3-512-backing", tip, backing=base)
    out["v2-4k"] = _seed("v2-4k", build(d / "v2.qcow2", opts=("compat=0.10",)))
    opts = ("extended_l2=on", "compression_type=zstd")
    writes = ("write -q -P 0x11 0 1k", "write -q -z 4k 2k", "write -q -P 0x33 6k 512", "write -q -c -P 0x22 32k 16k")
    out["v3-16k-extl2-zstd"] = _seed("v3-16k-extl2-zstd", build(d / "x.qcow2", cluster=16 * KiB, opts=opts, writes=writes))
    snap = build(d / "s.qcow2", writes=("write -q -P 0x11 0 8k", "write -q -c -P 0x22 16k 4k"))
    run("qemu-img", "snapshot", "-c", "s1", snap)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x44 4k 4k", snap)
    run("qemu-img", "bitmap", "--add", snap, "b0")
    out["v3-4k-snapshot-bitmap"] = _seed("v3-4k-snapshot-bitmap", snap)
    return out


READ_CHUNK = 1 * MiB
READ_BUDGET = 8 * MiB  # bytes read per example; a hostile size can claim terabytes
MEMORY_LIMIT = 200 * MiB


def _read_bounded(view: ChainView) -> None:
    """Read the whole disk if it is small, else what is allocated (capped)."""
    budget = READ_BUDGET
    if view.size <= 4 * MiB:
        ranges: list[tuple[int, int]] = [(0, view.size)]
    else:
        ranges = [(0, 64 * KiB), (view.size - 64 * KiB, view.size), *view.allocated_ranges()]
    for a, b in ranges:
        pos = a
        while pos < b and budget > 0:
            n = min(READ_CHUNK, b - pos, budget)
            got = view.read(pos, n)
            assert len(got) == n
            pos += n
            budget -= n


def _assert_names_a_file(e: ImageError) -> None:
    # Usually a file of the temporary directory, but a mutated backing name
    # may name any path (even "/"): only require that some file is named.
    assert e.path and str(e).startswith(f"{e.path}: ") and e.problem, str(e)


def exercise(tip: str) -> None:
    """Open, map, read and check an image: it works or raises ImageError.

    Any other exception propagates and fails the test; so does a peak of
    traced memory over MEMORY_LIMIT.
    """
    tracemalloc.start()
    try:
        try:
            with ChainView.open(tip) as view:
                entries = list(view.map())
                assert sum(e.length for e in entries) == view.size
                assert all(a.start + a.length == b.start for a, b in zip(entries, entries[1:]))
                for depth, layer in enumerate(view.layers):
                    describe_layer(layer, depth)
                _read_bounded(view)
        except ImageError as e:
            _assert_names_a_file(e)
        try:
            check_image(tip).render()
        except ImageError as e:
            _assert_names_a_file(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"peak of {peak} bytes traced"


def run_mutated(seed: Seed, data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="hostile-") as d:
        tip = os.path.join(d, "tip.qcow2")
        with open(tip, "wb") as f:
            f.write(data)
        if seed.backing is not None:
            with open(os.path.join(d, seed.backing[0]), "wb") as f:
                f.write(seed.backing[1])
        exercise(tip)


FUZZ = settings(
    # 30 x 40 tests: 1200 examples, ~25 s. HOSTILE_EXAMPLES=2000 for a long hunt.
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "30")),
    deadline=2000,  # ms per example; typical is ~10 ms
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def field_values(seed: Seed, fmt: str, original: int) -> st.SearchStrategy[int]:
    """Boundary and plausible values for one header field."""
    bits = struct.calcsize(fmt) * 8
    top = (1 << bits) - 1
    cs = seed.cluster_size
    n = len(seed.data)
    near = [0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 21, 22, 31, 32, 63, 64, 104, 112, 1023, 1024]
    near += [cs - 1, cs, cs + 1, 2 * cs, n - cs, n - 1, n, n + 1, n + cs, 1 << 31, 1 << 32, 1 << 63, top]
    candidates = sorted({v & top for v in near})
    return st.one_of(
        st.sampled_from(candidates),
        st.integers(0, top),
        st.integers(-4, 4).map(lambda d: (original + d) & top),
        st.integers(0, n // cs + 4).map(lambda k: (k * cs) & top),
        st.integers(0, bits - 1).map(lambda b: original ^ (1 << b)),
    )


def table_words(seed: Seed) -> st.SearchStrategy[int]:
    """Values for an L1/L2/refcount table entry: real-looking and hostile."""
    cs = seed.cluster_size
    n = len(seed.data)
    offsets = st.one_of(
        st.integers(0, n // cs + 4).map(lambda k: k * cs),
        st.integers(0, n + 4 * cs),
        st.sampled_from([OFFSET_MASK & ~(cs - 1), 1 << 40, 1 << 55]),
    )
    flags = st.sets(st.sampled_from([0, 1, 8, 9, 55, 56, 61, 62, 63])).map(lambda s: sum(1 << b for b in s))
    shift = 62 - (seed.cluster_bits - 8)
    compressed = st.builds(
        lambda off, sec: OFLAG_COMPRESSED | (sec << shift) | off,
        st.integers(0, n + cs),
        st.integers(0, (1 << (seed.cluster_bits - 8)) - 1),
    )
    return st.one_of(
        st.builds(lambda o, f: (o & OFFSET_MASK) | f, offsets, flags),
        compressed,
        st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, 1, OFLAG_COPIED, OFLAG_ZERO]),
    )


def overwrite(data: bytearray, region: tuple[int, int], draw: Callable, words: st.SearchStrategy[int]) -> None:
    """Overwrite a table word or a few random bytes inside ``region``."""
    a, b = region
    b = min(b, len(data))
    if b - a < 8:
        return
    if draw(st.booleans()):
        pos = a + 8 * draw(st.integers(0, (b - a) // 8 - 1))
        struct.pack_into(">Q", data, pos, draw(words))
    else:
        pos = draw(st.integers(a, b - 1))
        raw = draw(st.binary(min_size=1, max_size=min(16, b - pos)))
        data[pos : pos + len(raw)] = raw


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_header_fields(seeds: Seeds, name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    buf = bytearray(seed.data)
    names = FIELDS if seed.version == 3 else V2_FIELDS
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        field_name = data.draw(st.sampled_from(sorted(names)), label="field")
        offset, fmt = FIELDS[field_name]
        value = data.draw(field_values(seed, fmt, struct.unpack_from(fmt, buf, offset)[0]), label=field_name)
        struct.pack_into(fmt, buf, offset, value)
    run_mutated(seed, bytes(buf))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_header_bytes(seeds: Seeds, name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    buf = bytearray(seed.data)
    # Mostly the used part (header, extensions, backing name), sometimes anywhere.
    used = (0, 256) if data.draw(st.integers(0, 3)) else seed.header
    for _ in range(data.draw(st.integers(1, 4), label="patches")):
        pos = data.draw(st.integers(*used).map(lambda p: min(p, seed.header[1] - 1)), label="pos")
        raw = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        buf[pos : pos + len(raw)] = raw
    run_mutated(seed, bytes(buf))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@pytest.mark.parametrize("target", ["l1", "l2", "refcounts", "compressed"])
@FUZZ
@given(st.data())
def test_fuzz_tables(seeds: Seeds, name: str, target: str, data: st.DataObject) -> None:
    seed = seeds[name]
    buf = bytearray(seed.data)
    regions = {"l1": (seed.l1,), "l2": seed.l2, "refcounts": seed.refcounts, "compressed": seed.compressed}[target]
    words = table_words(seed)
    for _ in range(data.draw(st.integers(1, 4), label="patches")):
        region = data.draw(st.sampled_from(regions), label="region")
        overwrite(buf, region, data.draw, words)
    run_mutated(seed, bytes(buf))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_truncation(seeds: Seeds, name: str, data: st.DataObject) -> None:
    seed = seeds[name]
    length = data.draw(
        st.one_of(
            st.integers(0, len(seed.data) - 1),
            st.integers(0, len(seed.data) // seed.cluster_size).map(lambda k: k * seed.cluster_size),
            st.integers(0, 200),
        ),
        label="length",
    )
    run_mutated(seed, seed.data[:length])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SEED_NAMES)
@FUZZ
@given(st.data())
def test_fuzz_everything(seeds: Seeds, name: str, data: st.DataObject) -> None:
    """Several kinds of damage at once, anywhere."""
    seed = seeds[name]
    buf = bytearray(seed.data)
    words = table_words(seed)
    regions = [seed.header, seed.l1, *seed.l2, *seed.refcounts, *seed.compressed, (0, len(buf))]
    for _ in range(data.draw(st.integers(1, 6), label="patches")):
        if data.draw(st.booleans(), label="field?"):
            field_name = data.draw(st.sampled_from(sorted(FIELDS if seed.version == 3 else V2_FIELDS)))
            offset, fmt = FIELDS[field_name]
            value = data.draw(field_values(seed, fmt, struct.unpack_from(fmt, buf, offset)[0]), label=field_name)
            struct.pack_into(fmt, buf, offset, value)
        else:
            overwrite(buf, data.draw(st.sampled_from(regions), label="region"), data.draw, words)
    if data.draw(st.booleans(), label="truncate?"):
        del buf[data.draw(st.integers(0, len(buf) - 1), label="length") :]
    run_mutated(seed, bytes(buf))


def test_seeds_are_valid(seeds: Seeds, tmp_path: Path) -> None:
    """The fuzzers start from images that read and check clean."""
    for seed in seeds.values():
        d = tmp_path / seed.name
        d.mkdir()
        (d / "tip.qcow2").write_bytes(seed.data)
        if seed.backing:
            (d / seed.backing[0]).write_bytes(seed.backing[1])
        open_and_read(d / "tip.qcow2")
        report = check_image(str(d / "tip.qcow2"))
        assert report.ok, report.render()
