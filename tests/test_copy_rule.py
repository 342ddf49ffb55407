"""The aligned-copy rule, next to its function (engine/job.copy_cluster_size)."""

from __future__ import annotations

import pytest

from engine.job import copy_cluster_size, units_of

KiB = 1024
MiB = 1024 * KiB


@pytest.mark.parametrize(
    "granularity, cluster, unit",
    [
        (64 * KiB, 128 * KiB, 128 * KiB),  # the seed's case: one dirty block copies 128 KiB
        (64 * KiB, 64 * KiB, 64 * KiB),
        (128 * KiB, 64 * KiB, 128 * KiB),  # a dirty granule is copied whole
        (512, 2 * MiB, 2 * MiB),
        (64 * MiB, 512, 64 * MiB),
    ],
)
def test_copy_cluster_is_the_larger(granularity: int, cluster: int, unit: int) -> None:
    assert copy_cluster_size(granularity, cluster) == unit


def test_last_cluster_is_copied_up_to_the_device_end() -> None:
    size = 3 * 128 * KiB + 4096
    bits = units_of([(size - 1, size)], 128 * KiB, size)
    assert len(bits) == 4 and bits.to01() == "0001"


def test_units_cover_every_touched_cluster() -> None:
    bits = units_of([(64 * KiB, 64 * KiB + 1), (256 * KiB - 1, 256 * KiB + 1)], 128 * KiB, MiB)
    assert bits.to01() == "11100000"
