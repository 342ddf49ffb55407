"""Review of the remote's newest changes: each test here failed before its fix.

Against the real radosgw (the ``s3_remote`` fixture), driven through the
command line as a user would, or in this process through the real object
cache where what is measured is the cache's own GET count.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.commands import cli, repo_with_a_full
from tests.s3remote import S3Remote
from tests.test_remote_push import _listed, _summary

MiB = 1 << 20


def test_a_push_with_nothing_new_keeps_the_only_snapshot_that_reads(tmp_path: Path, s3_remote: S3Remote) -> None:
    """Snapshots that do not parse (damaged, or written by hand) above the one that
    does: a push with nothing new writes no snapshot, and its pruning of old
    snapshots must not delete the one the catalog is read from."""
    s3 = s3_remote
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(2 * MiB))
    repo = repo_with_a_full(tmp_path / "repo", "a", disk)
    cli("remote", "add", repo, "off", s3.url)
    s3.cli("push", repo, "off")
    before = _listed(s3, s3.url)
    assert "catalog/0000000001.json" in s3.keys()
    for n in (2, 3, 4):
        s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/catalog/{n:010d}.json", Body=b"{not json")
    assert _listed(s3, s3.url) == before  # the unreadable ones are passed over

    counts = _summary(s3.cli("push", repo, "off").stdout)
    assert counts["uploaded"] == 0 and counts["current"] == 1, counts
    assert "catalog/0000000001.json" in s3.keys()
    assert _listed(s3, s3.url) == before
    assert s3.cli("verify", s3.url).returncode == 0


def test_a_second_sequential_pass_over_an_evicted_object_is_read_ahead(tmp_path: Path, s3_remote: S3Remote,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that reads an object larger than the cache to its end, then again from
    the start (cmp, then sha256sum): the second pass is read ahead in large GETs as the
    first was, not fetched a block a GET (the read-ahead's mark stayed at the end)."""
    from engine.remote.objcache import ObjectCache
    from tests.test_remote_readahead import _cache

    size = 64 * MiB
    data = os.urandom(size)
    cache, cached = _cache(tmp_path, s3_remote, monkeypatch, data)
    try:
        small = ObjectCache(cache.store, str(tmp_path / "small"), 16 * MiB)
    finally:
        cache.close()
    try:
        cached = small.open(cached.obj, cached.etag)
        gets = []
        for _ in range(2):
            before = small.stats["gets"]
            for block in range(size // MiB):
                cached.ensure(block * MiB, MiB)()
            gets.append(small.stats["gets"] - before)
        # The cache keeps a quarter of the object: the second pass fetches it all again.
        assert gets[0] <= size // MiB // 2, gets
        assert gets[1] <= size // MiB // 2, gets
    finally:
        small.close()
