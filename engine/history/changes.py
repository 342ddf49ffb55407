"""What changed between two backups of a device, volume by volume, and its text.

For each volume found in either backup: a volume only in one is all ``A``
(or all ``D``); a volume whose byte range no changed disk range touches
(engine/history/blocks.py) has no change and is not read at all; ext2/3/4
on both sides goes through the fast path (engine/history/extdiff.py),
every other filesystem through the whole-tree comparison
(engine/history/treediff.py). A logical volume's ranges are not mapped
back to the disk: any change on the disk sends it to the comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.guest.disk import VolumeInfo
from engine.guest.guestdisk import GuestDisk
from engine.history.blocks import Ranges, clip
from engine.history.compare import Change
from engine.history.treediff import subtree, tree_changes
from engine.text import escape

log = logging.getLogger("backupfs.history")

EXT_KINDS = ("ext",)


def _same_place(a: VolumeInfo, b: VolumeInfo) -> bool:
    return (a.offset, a.size, a.kind) == (b.offset, b.size, b.kind) and not a.name.startswith("lvm-")


def diff_disks(old: GuestDisk, new: GuestDisk, changed: Ranges,
               fast: Callable[..., list[Change] | None] | None = None) -> list[Change]:
    """Every change between two backups' guest files, sorted by volume and path
    (a path both deleted and added, a type change, gives D before A)."""
    if fast is None:
        from engine.history.extdiff import ext_changes as fast
    old_infos = {i.name: i for i in old.infos() if i.readable}
    new_infos = {i.name: i for i in new.infos() if i.readable}
    out: list[Change] = []
    for name in sorted(old_infos.keys() | new_infos.keys()):
        a, b = old_infos.get(name), new_infos.get(name)
        if a is None:
            out.extend(subtree(name, new.volume(name), (), "A"))
            continue
        if b is None:
            out.extend(subtree(name, old.volume(name), (), "D"))
            continue
        if _same_place(a, b):
            here = clip(changed, a.offset, a.size)
            if not here:
                continue  # not one changed block in this volume
        else:
            here = [(0, max(a.size, b.size))]
        old_volume, new_volume = old.volume(name), new.volume(name)
        found = None
        if a.kind in EXT_KINDS and b.kind in EXT_KINDS:
            found = fast(name, old_volume, new_volume, here)
        if found is None:
            found = tree_changes(name, old_volume, new_volume, here)
        out.extend(found)
    return sorted(set(out), key=_order)


def _order(c: Change) -> tuple[str, bytes, int]:
    return c.volume, c.path, "DAMm".index(c.op)


def shown_path(c: Change) -> str:
    """``volume/path`` as printed: the guest's bytes, escaped (control characters, tabs, newlines)."""
    return escape(c.volume + "/" + c.path.decode("utf-8", "surrogateescape"))


def render(changes: list[Change]) -> bytes:
    """The ``changes`` file: one ``OP<TAB>volume/path`` line a change."""
    return "".join(f"{c.op}\t{shown_path(c)}\n" for c in changes).encode()
