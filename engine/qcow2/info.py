"""What `image info` shows about each image of a chain, as plain data."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from engine.qcow2.layers import COMPRESSED, DATA, ZERO, Layer, Qcow2Layer


def describe_layer(layer: Layer, depth: int) -> dict[str, Any]:
    """Facts about one layer: format, sizes, features, what it stores."""
    st = os.fstat(layer.fd)
    info: dict[str, Any] = {
        "depth": depth,
        "filename": layer.path,
        "format": layer.format,
        "virtual-size": layer.size,
        "actual-size": st.st_blocks * 512,
        "file-size": layer.file_size,
    }
    # Summed over the layer's extent rows, never a Python object per
    # extent: a small image can map millions of clusters one by one.
    rows = layer.extents()
    kinds = rows[:, 2]
    lengths = rows[:, 1] - rows[:, 0]
    info["data-bytes"] = int(lengths[(kinds == DATA) | (kinds == COMPRESSED)].sum(dtype=np.uint64))
    info["zero-bytes"] = int(lengths[kinds == ZERO].sum(dtype=np.uint64))
    if isinstance(layer, Qcow2Layer):
        h = layer.header
        info.update(
            {
                "cluster-size": h.cluster_size,
                "compat": h.compat,
                "compression-type": h.compression_name,
                "extended-l2": h.extended_l2,
                "refcount-bits": h.refcount_bits,
                "dirty-flag": bool(h.incompatible_features & 1),
                "corrupt": h.corrupt,
                "snapshots": h.nb_snapshots,
                "compressed-clusters": int(np.count_nonzero(kinds == COMPRESSED)),
            }
        )
        if h.backing_file is not None:
            info["backing-filename"] = h.backing_file
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
    return info
