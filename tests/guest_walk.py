"""Everything a guest disk shows, walked through engine/guest's public API, as a hostile-input check.

``walk`` is what the mount and the CLI do to a backup, squeezed into one
call: the volumes, the ``volumes`` text, every volume's tree (listings,
entries, links, xattrs, the first and last bytes of every file). It
returns how the disk fared: ``clean`` (nothing refused) or ``damaged``
(something gave GuestDamaged, or a volume is marked damaged). Any other
exception escapes to the caller: that is the bug a hostile guest finds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.guest.disk import DAMAGED
from engine.guest.guestdisk import GuestDisk
from engine.guest.reader import GuestDamaged
from engine.guest.volume import GuestPath, Volume

MAX_DEPTH = 24  # a directory that lists itself makes paths this deep, and no deeper, in a walk
MAX_NODES = 4000  # entries one walk visits (the seeds hold about 200)
READ_BYTES = 64 * 1024
EXPECTED = (GuestDamaged, FileNotFoundError, NotADirectoryError)


class BytesSource:
    """A guest disk held in memory, with patches laid over it (the fuzzer's mutations)."""

    def __init__(self, data: bytes | bytearray | memoryview, patches: dict[int, bytes] | None = None) -> None:
        self._data = memoryview(data)
        self.size = len(self._data)
        self._patches = sorted((patches or {}).items())

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset or offset < 0:
            return b""
        out = bytearray(self._data[offset:end])
        for at, patch in self._patches:
            if at < end and at + len(patch) > offset:
                lo, hi = max(at, offset), min(at + len(patch), end)
                out[lo - offset : hi - offset] = patch[lo - at : hi - at]
        return bytes(out)


@dataclass
class WalkResult:
    outcome: str = "clean"  # or "damaged"
    volumes: int = 0
    entries: int = 0
    refusals: list[str] = field(default_factory=list)  # the GuestDamaged messages, first few

    def refused(self, e: BaseException) -> None:
        self.outcome = "damaged"
        if len(self.refusals) < 5:
            self.refusals.append(f"{type(e).__name__}: {e}"[:300])


def walk(source: object) -> WalkResult:
    """Walk the whole disk; raise only what a hostile guest must never cause."""
    result = WalkResult()
    disk = GuestDisk(source)  # type: ignore[arg-type]
    try:
        infos = disk.infos()
        disk.volumes_text()
    except GuestDamaged as e:
        result.refused(e)
        return result
    for info in infos:
        if info.state == DAMAGED:
            result.refused(GuestDamaged(f"{info.name}: {info.reason}"))
        try:
            volume = disk.volume(info.name)
        except EXPECTED as e:
            if info.readable:
                result.refused(e)
            continue
        result.volumes += 1
        _walk_volume(volume, result)
    return result


def _walk_volume(volume: Volume, result: WalkResult) -> None:
    """Depth-first, bounded by MAX_DEPTH and MAX_NODES: a looping tree ends the walk, not the process."""
    stack: list[GuestPath] = [()]
    while stack and result.entries < MAX_NODES:
        path = stack.pop()
        try:
            names = sorted(volume.listing(path))
        except EXPECTED as e:
            result.refused(e)
            continue
        for name in names:
            child = path + (name,)
            result.entries += 1
            try:
                entry = volume.entry(child)
                if entry.is_dir and len(child) < MAX_DEPTH:
                    stack.append(child)
                elif entry.is_link:
                    volume.readlink(child)
                elif entry.is_file:
                    data = volume.data(child)
                    volume.read_data(data, 0, READ_BYTES)
                    volume.read_data(data, max(0, entry.size - READ_BYTES), READ_BYTES)
                volume.xattrs(child)
            except EXPECTED as e:
                result.refused(e)
