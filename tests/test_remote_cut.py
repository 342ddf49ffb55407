"""A push cut by the network, then resumed: a real TCP cut between boto3 and
radosgw (tests/cutproxy.py), a reset or a silent stall, mid-way through a
multipart upload. The push must stop in one line and bounded time, and the
next push (straight to radosgw) must send only what was not complete.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.commands import backupfs_cmd, cli, repo_with_a_full
from tests.cutproxy import CutProxy
from tests.s3remote import S3Remote
from tests.test_remote_push import _listed, _lock_released, _restores_equal, _summary

MiB = 1 << 20
READ_TIMEOUT = 2  # seconds, for the stalled push (BACKUPFS_S3_READ_TIMEOUT)


def _files(repo: Path, device: str) -> dict[str, int]:
    """The device's images and checksum files, by the key they get on the remote."""
    return {f"devices/{device}/{p.name}": p.stat().st_size for p in sorted((repo / "devices" / device).iterdir())
            if p.suffix in (".qcow2", ".sums")}


@pytest.fixture
def three_devices(tmp_path: Path, s3_remote: S3Remote) -> Path:
    """Device a: a 20 MiB full (multipart) and an incremental; b: a 3 MiB full (one
    PUT); c: a 24 MiB full (multipart). A push sends a, b, then c."""
    disks = {}
    for name, size in (("a", 20), ("b", 3), ("c", 24)):
        disks[name] = tmp_path / f"disk-{name}"
        disks[name].write_bytes(os.urandom(size * MiB))
    repo = repo_with_a_full(tmp_path / "repo", "a", disks["a"])
    with open(disks["a"], "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    cli("backup", repo, "a", "incremental")
    for name in ("b", "c"):
        cli("device", "add", repo, name, disks[name])
        cli("backup", repo, name, "full")
    cli("remote", "add", repo, "off", s3_remote.url)
    return repo


@pytest.fixture
def proxy_target(s3_remote: S3Remote) -> Iterator[tuple[str, int]]:
    u = urlparse(s3_remote.cluster.endpoint)
    yield (u.hostname or "127.0.0.1", u.port or 80)


@pytest.mark.parametrize("mode", ["reset", "stall"])
def test_a_push_cut_by_the_network_resumes(three_devices: Path, s3_remote: S3Remote, tmp_path: Path,
                                           proxy_target: tuple[str, int], mode: str) -> None:
    repo = three_devices
    done_before = {**_files(repo, "a"), **_files(repo, "b")}  # sent whole before the cut
    c_files = _files(repo, "c")
    proxy = CutProxy(proxy_target, sum(done_before.values()) + 12 * MiB, mode)  # half-way through c's image
    try:
        cli("remote", "add", repo, "cut", s3_remote.url, "--endpoint", proxy.endpoint)
        started = time.monotonic()
        proc = subprocess.run(backupfs_cmd() + ["push", str(repo), "cut"], capture_output=True, text=True,
                              env=s3_remote.env(BACKUPFS_S3_READ_TIMEOUT=str(READ_TIMEOUT)), timeout=300)
        took = time.monotonic() - started
        assert proxy.cut.is_set()
    finally:
        proxy.close()
    err = proc.stderr.strip()
    print(f"{mode}: the cut push failed after {took:.1f} s: {err}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("backupfs: error: remote cut ("), err
    assert s3_remote.cluster.secret_key not in proc.stderr + proc.stdout
    assert "uploadId" not in err and "Error" not in err, err  # botocore's words are not the user's
    assert any(w in err for w in ("cannot reach the endpoint", "was cut or stalled", "stopped answering")), err
    assert took < 60, f"{took:.1f} s to give up"

    keys = s3_remote.keys()
    present = {k: v for k, v in keys.items() if k.startswith("devices/")}
    assert present == done_before  # a and b whole; nothing of c
    assert not any(k.startswith("catalog/") for k in keys)

    counts = _summary(s3_remote.cli("push", repo, "off").stdout)  # straight to radosgw
    assert counts["resumed"] == len(done_before) and counts["uploaded"] == len(c_files), counts
    assert counts["bytes"] == sum(c_files.values()), counts  # only c's bytes went again
    assert _lock_released(s3_remote)  # the cut push's lock (left, its pid dead) taken over
    assert s3_remote.client.list_multipart_uploads(Bucket=s3_remote.bucket).get("Uploads", []) == []
    assert s3_remote.cli("verify", s3_remote.url).returncode == 0
    assert _listed(s3_remote, s3_remote.url) == _listed(s3_remote, repo)
    assert [_restores_equal(s3_remote, repo, tmp_path, d) for d in ("a", "b", "c")] == [2, 1, 1]
