"""What `image info` shows about each image of a chain, as plain data."""

from __future__ import annotations

import os
from typing import Any

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
    alloc = layer.allocation()
    info["data-bytes"] = sum(e.end - e.start for e in alloc if e.kind in (DATA, COMPRESSED))
    info["zero-bytes"] = sum(e.end - e.start for e in alloc if e.kind == ZERO)
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
                "compressed-clusters": sum(1 for e in alloc if e.kind == COMPRESSED),
            }
        )
        if h.backing_file is not None:
            info["backing-filename"] = h.backing_file
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
    return info
