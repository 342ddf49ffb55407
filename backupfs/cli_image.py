"""`backupfs image info|map|cat|check`: inspect any qcow2 chain without QEMU."""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from engine.errors import BackupfsError, UsageError
from engine.text import escape
from engine.units import format_size

if TYPE_CHECKING:
    from engine.chain import ChainView

_CAT_CHUNK = 4 * 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser("image", help="inspect a qcow2 image or chain (ours or QEMU's)")
    isub = image.add_subparsers(dest="image_command", metavar="ACTION")
    isub.required = True

    p = isub.add_parser("info", help="the chain: files, sizes, cluster sizes, features")
    p.add_argument("tip", metavar="TIP")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(func=cmd_info)

    p = isub.add_parser("map", help="where each range lives (JSON lines, as qemu-img map)")
    p.add_argument("tip", metavar="TIP")
    p.set_defaults(func=cmd_map)

    p = isub.add_parser("cat", help="write the reconstructed disk to stdout")
    p.add_argument("tip", metavar="TIP")
    p.set_defaults(func=cmd_cat)

    p = isub.add_parser("check", help="structural check of one image (refcounts, tables)")
    p.add_argument("image", metavar="IMG")
    p.set_defaults(func=cmd_check)


def cmd_info(args: argparse.Namespace) -> int:
    from engine.chain import ChainView
    from engine.qcow2.info import describe_layer

    with ChainView.open(args.tip) as view:
        infos: list[dict[str, Any]] = []
        for depth, layer in enumerate(view.layers):
            info = describe_layer(layer, depth)
            if depth + 1 < len(view.layers):
                info["full-backing-filename"] = view.layers[depth + 1].path
            infos.append(info)
        if args.output == "json":
            json.dump(
                {"chain-depth": view.depth, "index-extents": view.extent_count, "images": infos},
                sys.stdout,
                indent=2,
            )
            sys.stdout.write("\n")
            return 0
        blocks = [_human_info(info) for info in infos]
        sys.stdout.write("\n\n".join(blocks) + "\n")
    return 0


def _human_info(info: dict[str, Any]) -> str:
    lines = [
        f"image: {escape(info['filename'])}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {format_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(f"backing file: {escape(info['backing-filename'])}")
        if "full-backing-filename" in info:
            lines[-1] += f" (actual path: {escape(info['full-backing-filename'])})"
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {escape(info['backing-filename-format'])}")
    lines.append(
        f"stored: {format_size(info['data-bytes'])} data ({info['data-bytes']} bytes), "
        f"{format_size(info['zero-bytes'])} marked zero"
    )
    if info["format"] == "qcow2":
        lines += [
            "Format specific information:",
            f"    compat: {info['compat']}",
            f"    compression type: {info['compression-type']}",
            f"    refcount bits: {info['refcount-bits']}",
            f"    extended l2: {str(info['extended-l2']).lower()}",
        ]
        if info["compressed-clusters"]:
            lines.append(f"    compressed clusters: {info['compressed-clusters']}")
        if info["snapshots"]:
            lines.append(f"    internal snapshots: {info['snapshots']}")
        if info["dirty-flag"]:
            lines.append("    dirty: true")
        if info["corrupt"]:
            lines.append("    corrupt: true")
    return "\n".join(lines)


def _warn_if_corrupt(view: ChainView) -> None:
    """Read as QEMU reads it, but not without saying so."""
    for layer in view.layers:
        header = getattr(layer, "header", None)
        if header is not None and header.corrupt:
            print(f"backupfs: warning: {escape(layer.path)}: QEMU marked this image corrupt; "
                  "what it reads may be wrong", file=sys.stderr)


def cmd_map(args: argparse.Namespace) -> int:
    from engine.chain import ChainView

    with ChainView.open(args.tip) as view:
        _warn_if_corrupt(view)
        out = sys.stdout
        for entry in view.map():
            out.write(json.dumps(entry.as_json_dict()) + "\n")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    """Stream the disk; into an empty regular file, zero runs become holes."""
    from engine.chain import ChainView

    if sys.stdout.isatty():
        raise UsageError("refusing to write a disk image to a terminal; redirect stdout to a file")
    fd = sys.stdout.fileno()
    sys.stdout.flush()
    try:
        st = os.fstat(fd)
        sparse = (
            stat.S_ISREG(st.st_mode)
            # Holes read as zeros only in a file that held nothing: `1<>`
            # over an old image must overwrite its zero regions too.
            and st.st_size == 0
            and os.lseek(fd, 0, os.SEEK_CUR) == 0
            # `>>`: every write lands at the end, whatever the offset asked.
            and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        )
    except OSError:
        sparse = False
    with ChainView.open(args.tip) as view:
        _warn_if_corrupt(view)
        if sparse:
            _cat_sparse(view, fd)
        else:
            _cat_stream(view, fd)
    return 0


def _write_all(fd: int, data: memoryview | bytes | bytearray) -> None:
    """Write all of ``data``; an OSError carries ``written``, the bytes that went before it."""
    view = memoryview(data)
    written = 0
    try:
        while view:
            n = os.write(fd, view)
            written += n
            view = view[n:]
    except OSError as e:
        e.written = written  # type: ignore[attr-defined]
        raise


def _output_error(e: OSError, pos: int, size: int) -> BackupfsError:
    """One line that says it was the output, where, and why (ext4's 16 TiB
    file limit says only "File too large")."""
    pos += getattr(e, "written", 0)
    return BackupfsError(f"writing the disk ({size} bytes) to standard output, at offset {pos}: {e.strerror}")


def _chunks(start: int, end: int) -> Iterator[tuple[int, int]]:
    for pos in range(start, end, _CAT_CHUNK):
        yield pos, min(_CAT_CHUNK, end - pos)


def _touching_merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with the touching ones joined (extents of different layers)."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _reader(view: ChainView) -> Callable[[int, memoryview], memoryview]:
    def read(pos: int, out: memoryview) -> memoryview:
        view.readinto(pos, out)
        return out

    return read


def _cat_stream(view: ChainView, fd: int) -> None:
    from engine.pipeline import copy_chunks

    def write(pos: int, data: memoryview | bytes | bytearray) -> None:
        try:
            _write_all(fd, data)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise  # the reader left (`| head`): not an error of ours
            raise _output_error(e, pos, view.size) from None

    copy_chunks(_chunks(0, view.size), _reader(view), write, _CAT_CHUNK)


def _cat_sparse(view: ChainView, fd: int) -> None:
    from engine.pipeline import copy_chunks

    # Whole chunks across extent boundaries: at depth 64 most extents are
    # one to four clusters, and a write per extent costs more than the copy.
    chunks = (c for start, end in _touching_merged(view.allocated_ranges()) for c in _chunks(start, end))

    def write(pos: int, data: memoryview | bytes | bytearray) -> None:
        try:
            os.lseek(fd, pos, os.SEEK_SET)
            _write_all(fd, data)
        except OSError as e:
            raise _output_error(e, pos, view.size) from None

    copy_chunks(chunks, _reader(view), write, _CAT_CHUNK)
    try:
        os.ftruncate(fd, view.size)
    except OSError as e:
        raise _output_error(e, view.size, view.size) from None


def cmd_check(args: argparse.Namespace) -> int:
    from engine.qcow2.check import check_image

    report = check_image(args.image)
    print(report.render())
    return 0 if report.ok else 1
