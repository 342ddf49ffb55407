"""Two backups of one volume compared path by path: the fallback that works for every filesystem.

Walks both trees in step, directory by directory; a name on one side only
is an ``A`` or a ``D`` (with everything under it), a name on both sides is
compared (engine/history/compare.py). Its cost is the size of the tree,
not of the change: filesystems with a fast path (engine/history/extdiff.py)
use it only where that cannot decide.
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.guest.volume import GuestPath, Volume
from engine.history.blocks import Ranges
from engine.history.compare import Change, compare


def subtree(volume_name: str, volume: Volume, path: GuestPath, op: str) -> Iterator[Change]:
    """``op`` for ``path`` and, if it is a directory, everything under it."""
    yield Change(volume_name, b"/".join(path), op)
    entry = volume.entry(path)
    if not entry.is_dir:
        return
    stack = [path]
    while stack:
        here = stack.pop()
        for name, child in sorted(volume.listing(here).items()):
            yield Change(volume_name, b"/".join(here + (name,)), op)
            if child.is_dir:
                stack.append(here + (name,))


def directory_changes(volume_name: str, old: Volume, new: Volume, path: GuestPath,
                      changed: Ranges) -> tuple[list[Change], list[GuestPath]]:
    """The changes among one directory's entries, and the subdirectories on both sides
    (to compare next). A directory whose entries changed is an ``m`` itself."""
    a, b = old.listing(path), new.listing(path)
    out: list[Change] = []
    both_dirs: list[GuestPath] = []
    for name in sorted(a.keys() | b.keys()):
        child = path + (name,)
        ea, eb = a.get(name), b.get(name)
        if ea is None:
            out.extend(subtree(volume_name, new, child, "A"))
        elif eb is None:
            out.extend(subtree(volume_name, old, child, "D"))
        else:
            out.extend(compare(volume_name, old, new, child, ea, eb, changed))
            if ea.is_dir and eb.is_dir:
                both_dirs.append(child)
            elif ea.is_dir != eb.is_dir:  # a directory replaced by a file or back: its contents went too
                if ea.is_dir:
                    out.extend(list(subtree(volume_name, old, child, "D"))[1:])
                else:
                    out.extend(list(subtree(volume_name, new, child, "A"))[1:])
    return out, both_dirs


def tree_changes(volume_name: str, old: Volume, new: Volume, changed: Ranges) -> list[Change]:
    """Every change between the two trees of a volume."""
    out = compare(volume_name, old, new, (), old.entry(()), new.entry(()), changed)  # the root, as ""
    stack: list[GuestPath] = [()]
    while stack:
        found, subdirs = directory_changes(volume_name, old, new, stack.pop(), changed)
        out.extend(found)
        stack.extend(subdirs)
    return with_parent_dirs(out, old, new)


def with_parent_dirs(changes: list[Change], old: Volume, new: Volume) -> list[Change]:
    """Add an ``m`` for each directory (present on both sides) whose entries were added or
    removed and that has no line of its own (its mtime restored, say)."""
    have = {(c.volume, c.path) for c in changes}
    extra = []
    for c in changes:
        if c.op not in "AD" or not c.path:
            continue
        parent = c.path.rpartition(b"/")[0]
        key = (c.volume, parent)
        if key in have:
            continue
        parts = tuple(p for p in parent.split(b"/") if p)
        try:
            if old.entry(parts).is_dir and new.entry(parts).is_dir:
                extra.append(Change(c.volume, parent, "m"))
                have.add(key)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return changes + extra
