"""The qcow2 on-disk layout: constants, the header, and its validation.

Reference: QEMU's docs/interop/qcow2.rst. Everything here is pure (bytes in,
values out) so hostile headers can be fuzzed without touching a file. The
limits are QEMU's own, so that we refuse exactly what QEMU would refuse to
open and never allocate memory a header merely asks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from engine.errors import ImageError, UsageError

MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9  # 512 B
MAX_CLUSTER_BITS = 21  # 2 MiB: QEMU's implementation limit
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
MAX_CHAIN_DEPTH = 1000
SUBCLUSTERS = 32  # per cluster, with extended L2 entries

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}
COMPRESS_CHOICES = ("zstd", "none")  # what backupfs writes: zstd clusters, or plain ones

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_KNOWN_EXTENSIONS = frozenset(
    {EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE}
)

# Table entry fields.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
L1E_RESERVED = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62
L2E_RESERVED = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61 (standard clusters)
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_RESERVED = 0x1FF

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # with compression_type and padding, as QEMU writes it

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3_TAIL = struct.Struct(">QQQII")  # 32 bytes: features, refcount_order, header_length


def validate_compress(compress: str) -> str:
    """A compression backupfs writes ("zstd" or "none"), or UsageError."""
    if compress not in COMPRESS_CHOICES:
        raise UsageError(f"unknown compression {compress!r} (choose from {', '.join(COMPRESS_CHOICES)})")
    return compress


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass
class Header:
    """A parsed and validated qcow2 header with its extensions."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    crypt_method: int = 0
    bitmaps_ext: tuple[int, int, int] | None = None  # nb_bitmaps, dir size, dir offset
    unknown_extensions: list[int] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def corrupt(self) -> bool:
        """QEMU found its metadata inconsistent and stopped writing it.

        Read-only use goes on, as in QEMU (every table entry is checked
        as it is read anyway); adopting it as backups does not.
        """
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES.get(self.compression_type, str(self.compression_type))

    @property
    def csize_shift(self) -> int:
        """Bit where a compressed descriptor's sector count starts."""
        return 62 - (self.cluster_bits - 8)

    def l1_entries_needed(self) -> int:
        per_l2 = self.cluster_size * self.l2_entries
        return (self.size + per_l2 - 1) // per_l2


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """L1 entries a virtual size needs: each covers one L2 table's worth of clusters."""
    per_l2 = (1 << cluster_bits) * ((1 << cluster_bits) // (16 if extended_l2 else 8))
    return (size + per_l2 - 1) // per_l2


def parse_header(path: str, data: bytes, file_size: int) -> Header:
    """Parse and validate the first cluster of an image.

    ``data`` must hold at least the first cluster (or the whole file if it
    is shorter). Raises ImageError naming ``path`` for anything QEMU would
    refuse or that we cannot read.
    """

    def bad(problem: str) -> ImageError:
        return ImageError(path, problem)

    if len(data) < 4 or data[:4] != MAGIC:
        raise bad("not a qcow2 image (bad magic)")
    if len(data) < V2_HEADER_LENGTH:
        raise bad("truncated qcow2 header")
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(data, 0)
    if version not in (2, 3):
        raise bad(f"unsupported qcow2 version {version} (backupfs reads versions 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(
            f"cluster_bits {cluster_bits} out of range "
            f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}, i.e. 512 B to 2 MiB)"
        )
    cluster_size = 1 << cluster_bits
    if len(data) < min(cluster_size, file_size):
        raise bad("truncated: the header cluster is incomplete")
    header = Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        crypt_method=crypt_method,
        header_length=V2_HEADER_LENGTH,
    )
    if version == 3:
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise bad("truncated version 3 header")
        (
            header.incompatible_features,
            header.compatible_features,
            header.autoclear_features,
            header.refcount_order,
            header.header_length,
        ) = _V3_TAIL.unpack_from(data, 72)
        if header.header_length < V3_MIN_HEADER_LENGTH or header.header_length % 8:
            raise bad(f"invalid header_length {header.header_length}")
        if header.header_length > cluster_size or header.header_length > len(data):
            raise bad(f"header_length {header.header_length} exceeds the first cluster")
        if header.header_length > 104:
            header.compression_type = data[104]

    _check_features(path, header)
    _check_tables(path, header, file_size)

    _parse_extensions(path, header, data, backing_file_offset, cluster_size)

    header.backing_file = _backing_name(path, header, data, backing_file_offset, backing_file_size)
    return header


def _check_features(path: str, header: Header) -> None:
    """Refuse what the header asks for that backupfs cannot read as QEMU
    would: encryption, an external data file, unknown incompatible features,
    a compression type without its bit (or the other way round)."""
    crypt_method, cluster_bits = header.crypt_method, header.cluster_bits

    def bad(problem: str) -> ImageError:
        return ImageError(path, problem)

    if crypt_method:
        raise bad("encrypted images are not supported")
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise bad(f"unknown incompatible feature bits {unknown:#x} (image from a newer QEMU?)")
    if header.incompatible_features & INCOMPAT_DATA_FILE:
        raise bad("images with an external data file are not supported")
    if header.incompatible_features & INCOMPAT_COMPRESSION:
        if header.header_length <= 104 or header.compression_type == COMPRESSION_ZLIB:
            raise bad("compression type bit set but no compression type given")
    elif header.compression_type != COMPRESSION_ZLIB:
        raise bad("compression type field set without its feature bit")
    if header.compression_type not in COMPRESSION_NAMES:
        raise bad(f"unknown compression type {header.compression_type}")
    if header.extended_l2 and cluster_bits < 14:
        raise bad("extended L2 entries need clusters of at least 16 KiB")
    if header.refcount_order > 6:
        raise bad(f"refcount_order {header.refcount_order} out of range (0..6)")


def _check_tables(path: str, header: Header, file_size: int) -> None:
    """The L1, refcount and snapshot tables: aligned, inside the file, and
    no larger than QEMU allows."""
    l1_size, size, cluster_size = header.l1_size, header.size, header.cluster_size
    l1_table_offset, refcount_table_offset = header.l1_table_offset, header.refcount_table_offset
    refcount_table_clusters = header.refcount_table_clusters
    nb_snapshots, snapshots_offset = header.nb_snapshots, header.snapshots_offset

    def bad(problem: str) -> ImageError:
        return ImageError(path, problem)

    if l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table of {l1_size} entries exceeds QEMU's 32 MiB limit")
    if l1_size < header.l1_entries_needed():
        raise bad(
            f"L1 table too small: {l1_size} entries for a virtual size of {size} "
            f"(needs {header.l1_entries_needed()})"
        )
    if l1_size:
        _check_table(path, "L1 table", l1_table_offset, l1_size * 8, cluster_size, file_size)
    if refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise bad(f"refcount table of {refcount_table_clusters} clusters exceeds QEMU's 8 MiB limit")
    if refcount_table_clusters:
        _check_table(
            path,
            "refcount table",
            refcount_table_offset,
            refcount_table_clusters * cluster_size,
            cluster_size,
            file_size,
        )
    if nb_snapshots:
        if nb_snapshots > 65536:
            raise bad(f"{nb_snapshots} internal snapshots exceeds QEMU's limit of 65536")
        _check_table(path, "snapshot table", snapshots_offset, 40, cluster_size, file_size)


def _backing_name(path: str, header: Header, data: bytes, backing_file_offset: int,
                  backing_file_size: int) -> str | None:
    """The backing file's name, which must lie in the header cluster after the header."""
    cluster_size = header.cluster_size

    def bad(problem: str) -> ImageError:
        return ImageError(path, problem)

    if backing_file_offset and backing_file_size:  # an empty name is no backing file, as in QEMU
        if backing_file_size > MAX_BACKING_NAME:
            raise bad(f"backing file name of {backing_file_size} bytes is too long (max 1023)")
        if backing_file_offset + backing_file_size > min(cluster_size, len(data)):
            raise bad("backing file name lies outside the header cluster")
        if backing_file_offset < header.header_length:
            raise bad("backing file name overlaps the header")
        raw_name = bytes(data[backing_file_offset : backing_file_offset + backing_file_size])
        return raw_name.decode("utf-8", "surrogateescape")
    return None


def _check_table(
    path: str, what: str, offset: int, length: int, cluster_size: int, file_size: int
) -> None:
    if offset % cluster_size:
        raise ImageError(path, f"{what} offset {offset:#x} is not cluster-aligned")
    if offset == 0:
        raise ImageError(path, f"{what} overlaps the header at offset 0")
    if offset + length > file_size:
        raise ImageError(
            path, f"{what} at {offset:#x} (+{length} bytes) lies outside the file ({file_size} bytes)"
        )


def _parse_extensions(
    path: str, header: Header, data: bytes, backing_file_offset: int, cluster_size: int
) -> None:
    if header.version == 2 and header.header_length == V2_HEADER_LENGTH:
        pos = V2_HEADER_LENGTH
    else:
        pos = header.header_length
    end = backing_file_offset if backing_file_offset else cluster_size
    end = min(end, len(data))
    seen: set[int] = set()
    while pos + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", data, pos)
        pos += 8
        if ext_type == EXT_END:
            return
        if pos + ext_len > end:
            raise ImageError(path, f"header extension {ext_type:#010x} runs past the header area")
        payload = bytes(data[pos : pos + ext_len])
        if ext_type in seen and ext_type in _KNOWN_EXTENSIONS:
            raise ImageError(path, f"header extension {ext_type:#010x} appears twice")
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            header.backing_format = payload.decode("ascii", "replace")
        elif ext_type == EXT_BITMAPS:
            if ext_len < 24:
                raise ImageError(path, "bitmaps header extension is too short")
            nb, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", payload, 0)
            header.bitmaps_ext = (nb, dir_size, dir_offset)
        elif ext_type == EXT_CRYPTO:
            raise ImageError(path, "encrypted images are not supported")
        elif ext_type in (EXT_FEATURE_TABLE, EXT_DATA_FILE):
            pass
        else:
            header.unknown_extensions.append(ext_type)
        pos += _align_up(ext_len, 8)
    # No end marker inside the area: QEMU accepts that when the area is full.


def pack_header(header: Header) -> bytes:
    """Serialise a version 3 header (without extensions)."""
    if header.version != 3:
        raise ValueError("backupfs writes version 3 images only")
    head = _V2.pack(
        MAGIC,
        3,
        0,  # backing_file_offset: patched by the caller that places the name
        0,
        header.cluster_bits,
        header.size,
        0,
        header.l1_size,
        header.l1_table_offset,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.nb_snapshots,
        header.snapshots_offset,
    )
    tail = _V3_TAIL.pack(
        header.incompatible_features,
        header.compatible_features,
        header.autoclear_features,
        header.refcount_order,
        V3_HEADER_LENGTH,
    )
    extra = bytes([header.compression_type]) + bytes(7)
    return head + tail + extra


def pack_extension(ext_type: int, payload: bytes) -> bytes:
    pad = _align_up(len(payload), 8) - len(payload)
    return struct.pack(">II", ext_type, len(payload)) + payload + bytes(pad)


def encode_header_cluster(
    header: Header, cluster_size: int, backing_file: str | None, backing_format: str | None
) -> bytes:
    """The whole first cluster: header, extensions, end marker, backing name."""
    out = bytearray(pack_header(header))
    if backing_file is not None and backing_format:
        out += pack_extension(EXT_BACKING_FORMAT, backing_format.encode("ascii"))
    out += pack_extension(EXT_END, b"")
    if backing_file is not None:
        name = backing_file.encode("utf-8", "surrogateescape")
        if len(name) > MAX_BACKING_NAME:
            raise ValueError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        offset = len(out)
        out += name
        struct.pack_into(">QI", out, 8, offset, len(name))
    if len(out) > cluster_size:
        raise ValueError(
            f"header, extensions and backing file name need {len(out)} bytes, "
            f"more than one {cluster_size}-byte cluster"
        )
    return bytes(out) + bytes(cluster_size - len(out))
