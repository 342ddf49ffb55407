"""What a damaged backup means for the next steps: what verify advises, and
which backups a new one must not build on.

`verify` records its verdict of each backup in the catalog (``verdicts``).
An incremental or differential reads through its parent chain: built on a
backup verify found bad, it could never be restored whole, and the user
would learn that only at the restore. So it is refused, with what to do;
a full (``auto_full=1`` / ``--auto-full``) starts a new chain instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.catalog import BackupRecord, Catalog
from engine.errors import UsageError
from engine.text import escape, one_line


class DamagedParent(UsageError):
    """An incremental or differential whose chain holds a backup verify found bad (EINVAL)."""


def damaged_ancestor(catalog: Catalog, lineage: Sequence[BackupRecord]) -> tuple[str, str] | None:
    """The newest backup of ``lineage`` (a parent and its ancestors, newest
    first) that the last verify found bad, with its problem; None when none was."""
    bad = catalog.bad_verdicts([b.id for b in lineage])
    for b in lineage:
        if b.id in bad:
            return b.id, bad[b.id]
    return None


def refusal(device: str, kind: str, bad_id: str, problem: str) -> DamagedParent:
    """The one line that refuses an incremental onto a damaged chain, and says what to do."""
    return DamagedParent(
        f"device {device}: a new {kind} would read through backup {escape(bad_id)}, which verify found "
        f"damaged ({one_line(problem)}); take a full backup to start a new chain (auto_full=1 in the "
        "trigger, --auto-full to 'backupfs backup' does that instead of refusing), then remove the damaged "
        "backups with 'backupfs prune --remove ID', newest first"
    )


def advice(repo: str, device: str, backups: Sequence[BackupRecord], bad: set[str], checked: set[str],
           latest_damaged: bool) -> list[str]:
    """What to do about ``device``'s damaged backups (``bad``: those verify
    found unreadable, their own or through a parent), one line a step.

    ``backups``: the device's, oldest first; ``checked``: those this
    verify looked at (a good one among them can be restored from);
    ``latest_damaged``: the newest backup is among the bad ones, so the
    next incremental would build on the damage.
    """
    r, d = escape(repo), escape(device)
    lines: list[str] = []
    good = [b.id for b in backups if b.id in checked and b.id not in bad]
    if good:
        lines.append(f"restore from a backup that verifies, e.g. the newest: "
                     f"backupfs restore {r} {d} {escape(good[-1])} TARGET")
    else:
        lines.append(f"no verified backup of {d} is left to restore from; copy out the files that are "
                     f"still readable: backupfs restore {r} {d} ID DIR --include PATH")
    if latest_damaged:
        lines.append(f"take a full backup now to start a new chain: backupfs backup {r} {d} full "
                     "(incrementals and differentials onto a damaged backup are refused; "
                     "--auto-full / auto_full=1 in schedules takes a full instead)")
    removable = [b.id for b in reversed(backups) if b.id in bad]
    if removable:
        shown = ", ".join(escape(i) for i in removable[:5]) + (", ..." if len(removable) > 5 else "")
        lines.append(f"then remove the damaged backups, newest first ({shown}): "
                     f"backupfs prune {r} {d} --remove ID; and check the disk holding the repository")
    return [f"what to do: {line}" for line in lines]
