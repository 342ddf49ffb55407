"""Following backing links: from a tip image down to its base.

Resolution follows QEMU: a relative backing name is relative to the
directory of the image that names it (as that image's path was given, not
the current directory); the backing format comes from the header extension,
or is probed. Loops and absurd depths are refused before anything is read.
"""

from __future__ import annotations

import os
import re
import stat

from engine.errors import ImageError
from engine.qcow2.format import MAX_CHAIN_DEPTH
from engine.qcow2.layers import Layer, open_layer

_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def resolve_backing(image_path: str, backing_name: str) -> str:
    """The path a backing name designates, relative to the naming image."""
    m = _PROTOCOL.match(backing_name)
    if m:
        proto = m.group(1).lower()
        if proto == "file":
            backing_name = backing_name[len(m.group(0)) :]
        else:
            raise ImageError(
                image_path,
                f"backing file {backing_name!r} uses the {proto!r} protocol; "
                "backupfs follows plain file paths only",
            )
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_path), backing_name)


def open_chain(tip: str, max_depth: int = MAX_CHAIN_DEPTH) -> list[Layer]:
    """Open ``tip`` and every backing file below it, tip first.

    On error every layer opened so far is closed again.
    """
    layers: list[Layer] = []
    seen: dict[tuple[int, int], str] = {}
    path: str | None = tip
    fmt: str | None = None
    try:
        while path is not None:
            if len(layers) >= max_depth:
                raise ImageError(tip, f"backing chain is deeper than {max_depth} images")
            layer = open_layer(path, fmt)
            layers.append(layer)
            st = os.fstat(layer.fd)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ImageError(path, f"backing chain loops back to {seen[key]}")
            seen[key] = path
            if layer.backing_file is None:
                break
            fmt = layer.backing_format
            if fmt is not None and fmt not in ("qcow2", "raw"):
                raise ImageError(
                    path, f"backing file format {fmt!r} is not supported (qcow2 and raw are)"
                )
            next_path = resolve_backing(path, layer.backing_file)
            try:
                if stat.S_ISDIR(os.stat(next_path).st_mode):
                    raise ImageError(path, f"backing file {layer.backing_file!r} ({next_path}) is a directory")
            except FileNotFoundError:
                raise ImageError(path, f"backing file {layer.backing_file!r} not found ({next_path})") from None
            except ValueError:
                raise ImageError(path, f"backing file name {layer.backing_file!r} contains a NUL byte") from None
            except OSError as e:  # a symlink loop, a directory without search permission...
                raise ImageError(path, f"backing file {layer.backing_file!r} ({next_path}): {e.strerror}") from None
            path = next_path
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return layers
