"""The guest's files in one backup: its volumes, found once and opened when first used.

Both faces use it: the mount (``MOUNT/<device>/files/<id>/``, through
backupfs/filescache.py, which keeps a few open and drops idle ones) and
the CLI (``backupfs ls``, ``dump``, ``restore --include``). It reads the
backup through the view it is given, and closes nothing it did not open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from engine.guest.disk import DAMAGED, OK, VolumeInfo, find_volumes, label_of, open_volume
from engine.guest.reader import Budget, ByteSource, GuestDamaged
from engine.guest.volume import GuestPath, Volume
from engine.text import escape

log = logging.getLogger("backupfs.guest")


class GuestDisk:
    """A backup's volumes: ``infos`` (every volume, with its state) and
    ``volume(name)`` (a readable one, parsed on first use)."""

    def __init__(self, source: ByteSource, on_close: Callable[[], None] | None = None, name: str = "") -> None:
        self.source = source
        self.name = name  # the backup's id, for the log
        self._on_close = on_close
        self.budget = Budget()
        self._lock = threading.Lock()
        self._infos: list[VolumeInfo] | None = None
        self._volumes: dict[str, Volume] = {}

    def close(self) -> None:
        """Let go of the volumes, and of the view if it was handed over."""
        with self._lock:
            self._volumes.clear()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> GuestDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infos(self) -> list[VolumeInfo]:
        """Every volume found, readable ones first opened to learn their label
        (a volume that fails to open is listed as damaged, with the reason)."""
        with self._lock:
            if self._infos is None:
                infos = find_volumes(self.source, self.budget)
                for info in infos:
                    if info.state == OK:
                        label_of(info, self.budget)
                    if info.state == DAMAGED:
                        log.info("%s: volume %s cannot be read: %s", escape(self.name) or "disk",
                                    info.name, info.reason)
                self._infos = infos
            return self._infos

    def readable(self) -> list[str]:
        """The names of the volumes that have a directory."""
        return [i.name for i in self.infos() if i.readable]

    def volume(self, name: str) -> Volume:
        """The volume called ``name``, parsed; FileNotFoundError if there is
        none, GuestDamaged if it cannot be read."""
        infos = {i.name: i for i in self.infos()}
        info = infos.get(name)
        if info is None:
            raise FileNotFoundError(name)
        with self._lock:
            volume = self._volumes.get(name)
            if volume is None:
                if not info.readable:
                    raise GuestDamaged(f"{name}: {info.reason}")
                volume = self._volumes[name] = open_volume(info, self.budget)
            return volume

    def resolve(self, path: str) -> tuple[Volume, GuestPath]:
        """A path as users write it (``p2/etc/fstab``) as a volume and the names within it."""
        parts = [p for p in path.split("/") if p and p != "."]
        if not parts or ".." in parts:
            raise FileNotFoundError(path)
        return self.volume(parts[0]), tuple(p.encode("utf-8", "surrogateescape") for p in parts[1:])

    def volumes_text(self) -> str:
        """The ``volumes`` file: a header, then one line a volume."""
        lines = ["NAME\tOFFSET\tSIZE\tFILESYSTEM\tLABEL\tSTATE"]
        for i in self.infos():
            state = i.state if not i.reason else f"{i.state}: {i.reason}"
            lines.append("\t".join([escape(i.name), str(i.offset), str(i.size), escape(i.fstype) or "-",
                                    escape(i.label) or "-", escape(state)]))
        return "\n".join(lines) + "\n"
