"""Hostile and corrupt qcow2 input: real images to patch, and how a refusal is checked.

Shared by the tests/test_qcow2_hostile_*.py files, each attacking one part.

The reader must refuse what it cannot read with ``ImageError`` (whose
message starts with the file's path, then the problem), never hang, never
let another exception escape to the caller, and never allocate what a
hostile header merely asks for. Every explicit case starts from a real
image made by QEMU (or by our writer) and patches a few bytes; the
hypothesis tests then mutate small valid images at random and require that
opening, mapping, reading and checking them either works or raises
``ImageError``, within a deadline and a memory bound.
"""

from __future__ import annotations

import gc
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.chain import ChainView
from engine.errors import ImageError
from engine.qcow2.format import OFFSET_MASK, OFLAG_COMPRESSED, Header, parse_header

from tests.oracle import run


# Header fields: name -> (offset, struct format).
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
V2_FIELDS = [name for name, (off, _f) in FIELDS.items() if off < 72]

# The writes every standard image gets: data, a zero cluster, a compressed
# cluster and a partial cluster (so the image has every kind of L2 entry).
STD_WRITES = (
    "write -q -P 0x11 0 4k",
    "write -q -z 8k 4k",
    "write -q -c -P 0x22 16k 4k",
    "write -q -P 0x33 20k 2k",
)


# -- helpers ------------------------------------------------------------------


def build(
    path: Path,
    *,
    cluster: int = 4096,
    size: str = "64K",
    opts: tuple[str, ...] = (),
    writes: tuple[str, ...] = STD_WRITES,
    backing: str | None = None,
    backing_fmt: str = "qcow2",
) -> Path:
    """A real image made by qemu-img, then written by qemu-io."""
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o", ",".join([f"cluster_size={cluster}", *opts])]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    run("qemu-img", *args, path, size)
    if writes:
        cmds: list[str] = []
        for w in writes:
            cmds += ["-c", w]
        run("qemu-io", "-f", "qcow2", *cmds, path)
    return path


class Img:
    """Byte-level access to one image file, for patching its structures."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    @property
    def header(self) -> Header:
        data = self.data
        return parse_header(str(self.path), data, len(data))

    @property
    def cs(self) -> int:
        return 1 << struct.unpack_from(">I", self.data, 20)[0]

    def get(self, fmt: str, offset: int) -> int:
        return struct.unpack_from(fmt, self.data, offset)[0]

    def put(self, fmt: str, offset: int, value: int) -> None:
        buf = bytearray(self.data)
        end = offset + struct.calcsize(fmt)
        if end > len(buf):
            buf += bytes(end - len(buf))
        struct.pack_into(fmt, buf, offset, value)
        self.path.write_bytes(bytes(buf))

    def put_bytes(self, offset: int, raw: bytes) -> None:
        buf = bytearray(self.data)
        buf[offset : offset + len(raw)] = raw
        self.path.write_bytes(bytes(buf))

    def set_field(self, name: str, value: int) -> None:
        offset, fmt = FIELDS[name]
        self.put(fmt, offset, value)

    def truncate(self, length: int) -> None:
        os.truncate(self.path, length)

    # Table locations (read with the header as it is now).

    def l1_entry(self, index: int) -> int:
        """File offset of L1 entry ``index``."""
        return self.header.l1_table_offset + 8 * index

    def l2_table(self, l1_index: int = 0) -> int:
        return self.get(">Q", self.l1_entry(l1_index)) & OFFSET_MASK

    def l2_entry(self, guest: int) -> int:
        """File offset of the L2 entry mapping guest offset ``guest``."""
        h = self.header
        per_l2 = h.l2_entries * h.cluster_size
        l2 = self.l2_table(guest // per_l2)
        assert l2, "no L2 table there"
        return l2 + (guest % per_l2) // h.cluster_size * h.l2_entry_bytes

    def refblock(self, index: int = 0) -> int:
        return self.get(">Q", self.header.refcount_table_offset + 8 * index) & ~0x1FF

    def refcount_entry(self, cluster: int) -> int:
        """File offset of the (16-bit) refcount of host cluster ``cluster``."""
        h = self.header
        assert h.refcount_order == 4
        per_block = h.cluster_size // 2
        return self.refblock(cluster // per_block) + 2 * (cluster % per_block)


def compressed_descriptor(img: Img, coffset: int, nsectors: int) -> int:
    """An L2 entry of a compressed cluster at host offset ``coffset``, ``nsectors`` 512-byte sectors long."""
    shift = 62 - (img.header.cluster_bits - 8)
    return OFLAG_COMPRESSED | (nsectors - 1) << shift | coffset


def rename_backing(path: Path, new_name: str) -> None:
    """Replace the backing file name in place (same length, no other change)."""
    img = Img(path)
    offset, size = img.get(">Q", 8), img.get(">I", 16)
    assert len(new_name.encode()) == size, (new_name, size)
    img.put_bytes(offset, new_name.encode())


@contextmanager
def refused(path: Path | str, problem: str) -> Iterator[pytest.ExceptionInfo[ImageError]]:
    """Expect an ImageError whose message is "<path>: <problem...>"."""
    with pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: .*{problem}") as info:
        yield info
    assert info.value.path == str(path)


def open_and_read(path: Path | str) -> None:
    """What a user does with a chain: open it, map it, read all of it."""
    with ChainView.open(str(path)) as view:
        list(view.map())
        view.read(0, view.size)


def open_fds() -> int:
    """Descriptors this process holds, after earlier tests' garbage is
    collected (an unreferenced view closes its files whenever the collector
    runs, which would otherwise land in the middle of a count)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))
