"""How an RBD backup reads: the first read is already in flight, and nothing stays open.

Against a real single-node cluster (tests/cephcluster.py, the session's
``ceph_cluster``). bench/rbd_vs_export.py measures the speed; these say the
two things it relies on hold: the job's first read is served by the
read-ahead started before it (a read made there and then waited behind a
whole budget of aio), and a backup leaves no image of its snapshot open
(one per backup piled up in a mount's daemon).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from bitarray import bitarray

from engine.ceph import Cluster, parse
from engine.rbdimage import RbdImage
from engine.rbdsource import RbdSource
from engine.repo import Repository
from tests.cephcluster import CephCluster
from tests.cephcluster import RbdImage as ClusterImage

pytestmark = [pytest.mark.ceph, pytest.mark.long]

KiB = 1024
MiB = 1024 * KiB
UNIT = 64 * KiB


@pytest.fixture
def image(rbd_image: Callable[..., ClusterImage]) -> ClusterImage:
    """A 16 MiB image, removed with its snapshots after the test."""
    return rbd_image(16 * MiB)


class Counting(RbdSource):
    """The real source; records the reads it had to make there and then (no read-ahead held them)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.direct: list[tuple[int, int]] = []

    def _read_now(self, offset: int, length: int) -> bytes:
        self.direct.append((offset, length))
        return super()._read_now(offset, length)


def test_a_primed_source_serves_the_first_planned_reads_from_read_ahead(
        ceph_cluster: CephCluster, image: ClusterImage) -> None:
    data = os.urandom(4 * MiB)
    spec = parse(image.source, str(ceph_cluster.conf), None)
    with Cluster(spec) as cluster:
        head = RbdImage(cluster)
        head.write(3 * MiB, data)
        head.flush()
        head.create_snapshot("s1")
        head.close()
        units = bitarray(16 * MiB // UNIT, endian="little")
        units.setall(0)
        units[3 * MiB // UNIT: 7 * MiB // UNIT] = 1  # the planned clusters: where the data is
        source = Counting(RbdImage(cluster, snapshot="s1"), 16 * MiB, UNIT, None)
        try:
            source.prime(units, 2 * MiB)
            # The job's first claimed run, then the rest as it goes.
            assert source.read(3 * MiB, 1 * MiB) == data[:1 * MiB]
            assert source.direct == [], "the first read was not in flight before the job asked for it"
            assert source.read(4 * MiB, 3 * MiB) == data[1 * MiB:]
        finally:
            source.close()
        assert source.image.image is not None
        with pytest.raises(Exception):  # closed by the source: librbd refuses it
            source.image.image.size()


def test_a_backup_leaves_no_snapshot_image_open(ceph_cluster: CephCluster, image: ClusterImage, tmp_path: Path) -> None:
    """In one process (a mount's daemon), backup after backup: only the device's own handles stay open."""
    repo_dir = tmp_path / "repo"
    spec = parse(image.source, str(ceph_cluster.conf), None)
    with Cluster(spec) as cluster:
        head = RbdImage(cluster)
        head.write(0, os.urandom(2 * MiB))
        head.close()
    Repository.init(str(repo_dir))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("vm", image.source, UNIT, ceph_conf=str(ceph_cluster.conf))
        dev = repo.device("vm")
        for kind in ("full", "incremental", "incremental"):
            repo.backup("vm", kind, allow_empty=True)
            assert dev.cluster is not None
            open_images = [i.snapshot for i in dev.cluster.images]
            # The head, and the one reader every backup sets to its snapshot, back at the head.
            assert open_images == [None, None], f"after a {kind}: images open {open_images}"
