"""What a range of the disk holds, from its signature bytes: a filesystem, LVM, or a reason.

Magic numbers at fixed places, as blkid reads them, so that a volume we
do not parse still gets a name in ``volumes`` (swap, LUKS, BitLocker) and
a volume we parse is handed to the right parser. Nothing here trusts more
than the signature: the parser checks the rest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

EXT, XFS, BTRFS, FAT, EXFAT, NTFS = "ext", "xfs", "btrfs", "fat", "exfat", "ntfs"
LVM2, LUKS, BITLOCKER, SWAP = "LVM2_member", "crypto_LUKS", "BitLocker", "swap"
ENCRYPTED = (LUKS, BITLOCKER)

Peek = Callable[[int, int], bytes]  # (offset, length) -> bytes, short at the end


def probe(peek: Peek) -> str | None:
    """The kind of what starts here, or None if nothing we know."""
    head = peek(0, 4096)
    if head[3:11] == b"NTFS    ":
        return NTFS
    if head[3:11] == b"EXFAT   ":
        return EXFAT
    if head[:4] == b"XFSB":
        return XFS
    if head[:6] == b"LUKS\xba\xbe":
        return LUKS
    if head[3:11] == b"-FVE-FS-":
        return BITLOCKER
    if head[512:520] == b"LABELONE" and head[536:544] == b"LVM2 001":
        return LVM2
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return SWAP
    sb = peek(1024, 1024)
    if len(sb) >= 58 and sb[56:58] == b"\x53\xef":
        return EXT
    if peek(65536 + 64, 8) == b"_BHRfS_M":
        return BTRFS
    if _looks_fat(head):
        return FAT
    return None


def _looks_fat(boot: bytes) -> bool:
    """A FAT boot sector: the 0x55AA mark, a jump, and a sane BIOS parameter block."""
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa" or boot[0] not in (0xEB, 0xE9):
        return False
    bytes_per_sector, sectors_per_cluster, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
    return (bytes_per_sector in (512, 1024, 2048, 4096) and sectors_per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
            and reserved >= 1 and fats in (1, 2))
