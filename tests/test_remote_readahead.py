"""A remote mount's read-ahead (engine/remote/objcache.py) against the real radosgw:
it grows with a sequential reader and stays small for one that stops early.

Driven in this process through the real object cache; what was fetched is
counted by the cache itself once every GET it sent has finished.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.s3remote import S3Remote

MiB = 1 << 20
KEY = "devices/vm1/20261206T000000Z-0001-full.qcow2"


def _cache(tmp_path: Path, s3_remote: S3Remote, monkeypatch: pytest.MonkeyPatch, data: bytes):  # type: ignore[no-untyped-def]
    from engine.remote.digest import Checksum
    from engine.remote.layout import RemoteObject
    from engine.remote.location import parse_s3_url
    from engine.remote.objcache import ObjectCache
    from engine.remote.store import RemoteStore

    for k, v in s3_remote.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{KEY}", Body=data)
    store = RemoteStore("remote t", parse_s3_url(s3_remote.url))
    etag = store.listing()[KEY].etag
    cache = ObjectCache(store, str(tmp_path / "cache"), 1 << 30)
    return cache, cache.open(RemoteObject(KEY, len(data), Checksum(etag=etag, part_size=0)), etag)


def test_read_ahead_grows_with_a_sequential_reader_and_not_before(tmp_path: Path, s3_remote: S3Remote,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.remote.objcache import AHEAD_BLOCKS, FIRST_AHEAD, GET_BYTES

    data = os.urandom(96 * MiB)
    cache, cached = _cache(tmp_path, s3_remote, monkeypatch, data)
    try:
        for block in range(3):  # a probe: three sequential MiB, then nothing
            cached.ensure(block * MiB, MiB)()
        cache._pool.shutdown(wait=True)  # every GET sent has landed: count them all
        probe = cache.stats["bytes"]
        # The first window, then once doubled: far from the whole object (a fixed
        # 64 MiB window fetched 65 MiB here).
        assert 3 * MiB < probe <= (3 + FIRST_AHEAD + 2 * FIRST_AHEAD) * MiB, probe
    finally:
        cache.close()

    cache, cached = _cache(tmp_path / "again", s3_remote, monkeypatch, data)
    try:
        for block in range(96):  # a whole sequential read
            cached.ensure(block * MiB, MiB)()
            with open(cached.path, "rb") as f:
                f.seek(block * MiB)
                assert f.read(MiB) == data[block * MiB:(block + 1) * MiB]
        assert cached._window == AHEAD_BLOCKS  # grown all the way
        stats = dict(cache.stats)
        # In large GETs, not block by block: most of it fetched ahead of the reader.
        assert stats["bytes"] == 96 * MiB
        assert stats["gets"] <= 96 * MiB // GET_BYTES + 8, stats
    finally:
        cache.close()


def test_a_get_cut_mid_answer_leaves_no_bytes_in_the_cache(tmp_path: Path, s3_remote: S3Remote,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A GET's bytes land as they arrive; one cut half-way (a real TCP reset after
    4 MiB of the answer) fails the read, and what it had written is freed again:
    nothing the cache does not count stays on its disk."""
    from urllib.parse import urlparse

    from engine.errors import BackupfsError
    from engine.remote.digest import Checksum
    from engine.remote.layout import RemoteObject
    from engine.remote.location import parse_s3_url
    from engine.remote.objcache import BLOCK, ObjectCache, _data_blocks
    from engine.remote.store import RemoteStore
    from tests.cutproxy import CutProxy

    for k, v in s3_remote.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    data = os.urandom(16 * MiB)
    s3_remote.client.put_object(Bucket=s3_remote.bucket, Key=f"{s3_remote.prefix}/{KEY}", Body=data)
    target = urlparse(s3_remote.env()["AWS_ENDPOINT_URL"])
    etag = RemoteStore("remote t", parse_s3_url(s3_remote.url)).listing()[KEY].etag
    proxy = CutProxy((target.hostname or "127.0.0.1", target.port or 80), 4 * MiB, "reset", counting="to_client")
    try:
        store = RemoteStore("remote t", parse_s3_url(s3_remote.url), proxy.endpoint, attempts=1)
        cache = ObjectCache(store, str(tmp_path / "cache"), 1 << 30)
        try:
            cached = cache.open(RemoteObject(KEY, len(data), Checksum(etag=etag, part_size=0)), etag)
            with pytest.raises(BackupfsError):
                cached.ensure(0, 8 * MiB, ahead=False)()
            assert proxy.cut.is_set()
            assert not any(cached.present)
            assert _data_blocks(cached.fd, len(data) // BLOCK) == [False] * (len(data) // BLOCK)
        finally:
            cache.close()
    finally:
        proxy.close()
