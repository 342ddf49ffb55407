"""The flattened index against a brute-force model, on random synthetic chains."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.chain import flatten
from engine.qcow2.layers import COMPRESSED, DATA, UNALLOC, ZERO, Extent, Layer, coalesce, coalesce_rows

from tests.pagecache import drop_cached

UNIT = 512


class FakeLayer(Layer):
    def __init__(self, size: int, extents: list[Extent]) -> None:
        self.path = "fake"
        self.fd = -1
        self.size = size
        self._rows = np.array(extents, dtype=np.uint64).reshape(-1, 4)

    def extents(self) -> np.ndarray:
        return self._rows


@st.composite
def chains(draw: st.DrawFn) -> list[FakeLayer]:
    depth = draw(st.integers(1, 6))
    tip_units = draw(st.integers(0, 40))
    layers = []
    for d in range(depth):
        units = tip_units if d == 0 else draw(st.integers(0, 48))
        kinds = draw(st.lists(st.sampled_from([DATA, ZERO, COMPRESSED, UNALLOC, UNALLOC]), min_size=units,
                              max_size=units))
        extents = []
        for i, k in enumerate(kinds):
            host = (1000 + d * 100 + i) * UNIT if k == DATA else (7 << 40) + d * 100 + i if k == COMPRESSED else 0
            extents.append(Extent(i * UNIT, (i + 1) * UNIT, k, host))
        layers.append(FakeLayer(units * UNIT, coalesce(extents)))
    return layers


def model(layers: list[FakeLayer]) -> list[tuple[int, int, int, int]]:
    """Per unit: (kind, depth, host at that unit) the slow, obvious way."""
    out = []
    for u in range(layers[0].size // UNIT):
        pos = u * UNIT
        answer = None
        for d, layer in enumerate(layers):
            if pos >= layer.size:
                answer = (UNALLOC, d - 1, 0)
                break
            ext = next(e for e in layer.allocation() if e.start <= pos < e.end)
            if ext.kind != UNALLOC:
                host = ext.host + (pos - ext.start) if ext.kind == DATA else ext.host if ext.kind == COMPRESSED else 0
                answer = (ext.kind, d, host)
                break
        out.append(answer or (UNALLOC, len(layers) - 1, 0))
    return out


@pytest.mark.parametrize("sweep", ["c", "numpy"])
@given(layers=chains())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_flatten_matches_the_model(layers: list[FakeLayer], sweep: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.chain

    if sweep == "c":
        assert engine.chain._chainindex is not None, "the C index sweep is not built"
    else:
        monkeypatch.setattr(engine.chain, "_chainindex", None)
    pieces = flatten(layers)
    size = layers[0].size
    # Pieces tile [0, size) in order, with no gaps and no overlaps.
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)
    pos = 0
    for start, end, *_ in pieces:
        assert start == pos and end > start
        pos = end
    assert pos == size
    expanded = []
    for start, end, kind, depth, host in pieces:
        for u in range(start // UNIT, end // UNIT):
            h = host + (u * UNIT - start) if kind == DATA else host
            expanded.append((kind, depth, h))
    assert expanded == model(layers)


@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([DATA, ZERO, COMPRESSED, UNALLOC]),
                          st.integers(0, 3), st.booleans()), max_size=30))
@settings(max_examples=300, deadline=None)
def test_vectorised_coalesce_matches_the_plain_one(
    spec: list[tuple[int, int, int, bool]],
) -> None:
    """Layers coalesce their decoded tables as arrays; the tuple version is the model."""
    extents, pos, host = [], 0, 1 << 20
    for units, kind, jump, gap in spec:
        if gap:
            pos += UNIT  # a hole: neighbours across it must not merge
        length = units * UNIT
        h = host if kind == DATA else (5 << 40) + jump if kind == COMPRESSED else 0
        extents.append(Extent(pos, pos + length, kind, h))
        host += length + jump * UNIT  # jump 0: host-contiguous with the next DATA
        pos += length
    rows = np.array(extents, dtype=np.uint64).reshape(-1, 4)
    assert [tuple(r) for r in coalesce_rows(rows).tolist()] == [tuple(e) for e in coalesce(extents)]


def test_nowait_reads_and_advice(tmp_path, read_loop) -> None:  # type: ignore[no-untyped-def]
    """Cached data reads without waiting; uncached data says WouldBlock, and
    advice brings it in."""
    import os

    import pytest

    from engine.chain import ChainView, WouldBlock
    from engine.qcow2.writer import Qcow2Writer

    path = tmp_path / "img.qcow2"
    data = os.urandom(4 << 20)
    with Qcow2Writer(str(path), 8 << 20, 65536) as w:
        w.write(0, data)
        w.commit()
    with ChainView.open(str(path)) as view:
        assert view.read(0, 1 << 20) == data[: 1 << 20]  # now cached
        assert view.read(0, 1 << 20, nowait=True) == data[: 1 << 20]
        assert view.read(6 << 20, 4096, nowait=True) == bytes(4096)  # holes need no disk
        fd = view.layers[0].fd
        os.fsync(fd)
        host = view._hosts[view._starts.index(0)] + (2 << 20)
        # A nowait read of pages that are not cached starts their read-ahead
        # and says WouldBlock; on a fast disk that read can finish before the
        # kernel looks again, and then the nowait read returns the bytes. So:
        # a few tries, each on freshly dropped pages; the bytes, when they
        # come, must be right, and at least one try must say WouldBlock.
        blocked = 0
        for _ in range(5):
            drop_cached(fd, host, 1 << 20)
            try:
                got = view.read(2 << 20, 1 << 20, nowait=True)
            except WouldBlock:
                blocked += 1
            else:
                assert got == data[2 << 20 : 3 << 20]
        assert blocked, "nowait reads of uncached data never said WouldBlock"
        drop_cached(fd, host, 1 << 20)
        view.advise(2 << 20, 1 << 20)
        assert view.read(2 << 20, 1 << 20) == data[2 << 20 : 3 << 20]


def test_the_c_sweep_refuses_what_it_cannot_index() -> None:
    from engine import _chainindex

    size = 4 * UNIT
    good = np.array([[0, UNIT, DATA, 1 << 20]], dtype=np.uint64)
    sizes = np.array([size], dtype=np.uint64)
    starts, kinds, depths, hosts = _chainindex.flatten([good], sizes, size)
    assert np.frombuffer(starts, np.uint64).tolist() == [0, UNIT]
    assert list(kinds) == [DATA, UNALLOC]
    bad_rows = {
        "overlapping": [[0, 2 * UNIT, DATA, 0], [UNIT, 3 * UNIT, ZERO, 0]],
        "unsorted": [[2 * UNIT, 3 * UNIT, DATA, 0], [0, UNIT, ZERO, 0]],
        "empty extent": [[UNIT, UNIT, DATA, 0]],
        "unknown kind": [[0, UNIT, 9, 0]],
    }
    for rows in bad_rows.values():
        with pytest.raises(ValueError, match="layer 0"):
            _chainindex.flatten([np.array(rows, dtype=np.uint64)], sizes, size)
    with pytest.raises(ValueError, match="64-bit"):
        _chainindex.flatten([good.astype(np.int32)], sizes, size)
    with pytest.raises(ValueError, match="fours"):
        _chainindex.flatten([good.reshape(-1)[:3].copy()], sizes, size)
    with pytest.raises(ValueError, match="one size per layer"):
        _chainindex.flatten([good, good], sizes, size)
    with pytest.raises(ValueError, match="1 to 65535"):
        _chainindex.flatten([], np.zeros(0, dtype=np.uint64), size)
