"""The daemon's side of ``MOUNT/.control``: adding, removing and importing
devices while the repository is mounted.

The engine does the work (``Repository.add_device``, ``replace_source``,
``remove_device``, ``import_chain``: each all or nothing, durable, with
its own cleanup); this module decides when it may run and tells the
mount what changed, so the kernel's caches show it at once.

- One command at a time: a second gets EBUSY naming the one that runs, at
  its open (fs.py; its write would wait in the kernel for the first), or
  here if it opened before the first began writing.
  Two adds of one source under two names, or an add racing an import of
  the same name, would each pass the engine's checks alone.
- A device is not removed (nor its source replaced) while a job runs on
  it, while a file of it is open in the mount (its device file, a backup,
  a file inside one: a VM or a loop device would lose its disk under it),
  or while such an open is under way. The refusal names what is open and
  by whom.
- While a removal runs, the device's names are gone from the tree (opens
  and lookups answer ENOENT), so nothing reopens what is being deleted.
- A source, tip or backing directory on the mount itself is refused: read
  through the mount by its own daemon, it would copy the mount into itself.

Each command's outcome is one JSON object (``Outcome``) that the writer
reads back from its own open file; ``cat MOUNT/.control`` shows the
running or last command for people, and its ``user.backupfs.status``
xattr the same as data (the CLI's progress for a long import).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import outcome
import trio

from backupfs.control import ControlError, DeviceAdd, DeviceRemove, DeviceSet, Import, parse_control
from backupfs.mountinfo import check_sources_outside
from backupfs.requester import Requester
from backupfs.status import utc_text
from engine.ceph import is_rbd
from engine.errors import BackupfsError
from engine.job import CancelRequest
from engine.repo import Repository
from engine.text import one_line

log = logging.getLogger("backupfs.fs")

REQUESTER_POLL = 0.2  # seconds between looks at a waiting writer's signals (as backupfs/jobs.py)

Outcome = dict[str, Any]  # state, command, error, errno, and what the command made (see _succeeded)


@dataclass
class ControlStatus:
    """The running or last repository command, as ``cat MOUNT/.control`` shows it."""

    state: str = "idle"  # idle | running | succeeded | failed | cancelled
    command: str = ""
    requester: str | None = None
    started: float | None = None
    finished: float | None = None
    progress: str | None = None  # an import's layer, while it runs
    error: str | None = None
    errno: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"state": self.state, "command": self.command, "requester": self.requester,
                "started": self.started, "finished": self.finished, "progress": self.progress,
                "error": self.error, "errno": self.errno}

    def render(self) -> str:
        if self.state == "idle":
            return ("state: idle\nno repository command since the mount (device add|remove and import "
                    "write theirs here)\n")
        lines = [f"state: {self.state}", f"command: {one_line(self.command)}"]
        if self.started is not None:
            lines.append(f"started: {utc_text(self.started)}")
        if self.state == "running":
            if self.requester:
                lines.append(f"requested by: {one_line(self.requester)} (interrupt or kill it to cancel an import)")
            lines.append(f"progress: {one_line(self.progress or 'starting')}")
        else:
            if self.finished is not None:
                lines.append(f"finished: {utc_text(self.finished)}")
            if self.error:
                lines.append(f"error: {self.errno or 'EIO'}: {one_line(self.error)}")
        return "\n".join(lines) + "\n"


class Refused(Exception):
    """A command refused before it started, with the errno the writer gets."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class MountHooks:
    """What the control needs of the filesystem (backupfs/fs.py)."""

    job_running: Callable[[str], str | None]  # a device's running job, described; None if none
    open_files: Callable[[str], list[str]]  # a device's open files (and opens under way), described
    appeared: Callable[[str], Awaitable[None]]  # a device was added (or given a source)
    removed: Callable[[str], Awaitable[None]]  # a device is gone


@dataclass
class RepositoryControl:
    repo: Repository
    mountpoint: str | None
    hooks: MountHooks
    status: ControlStatus = field(default_factory=ControlStatus)
    removing: set[str] = field(default_factory=set)  # devices whose names the tree hides now
    _cancel: CancelRequest | None = None  # the running import's

    def cancel(self, reason: str) -> None:
        """Stop a running import before its next layer (the mount is going away)."""
        if self._cancel is not None:
            self._cancel.cancel(reason)

    async def run(self, line: bytes, requester: Requester | None) -> tuple[int, Outcome]:
        """Run one control line; (0 or the errno for the writer, the outcome it reads back)."""
        if self.status.state == "running":
            s = self.status
            by = f", requested by {s.requester}" if s.requester else ""
            message = (f"another repository command is running through the mount ({s.command}: "
                       f"{s.progress or 'starting'}{by}); try again when it is done")
            return errno.EBUSY, _failed(_one_line(line), message, errno.EBUSY)
        try:
            cmd = parse_control(line)
        except ControlError as e:
            return errno.EINVAL, _failed(_one_line(line), str(e), errno.EINVAL)
        s = self.status = ControlStatus("running", cmd.line(), requester.describe() if requester else None,
                                        time.time())
        try:
            if isinstance(cmd, DeviceRemove):
                made = await self._remove(cmd)
            elif isinstance(cmd, DeviceAdd):
                made = await self._add(cmd)
            elif isinstance(cmd, DeviceSet):
                made = await self._set(cmd)
            else:
                made = await self._import(cmd, requester)
        except Refused as e:
            return self._ended(s, "failed", str(e), e.errno)
        except BackupfsError as e:
            err = e.errno or errno.EIO
            state = "cancelled" if err == errno.ECANCELED else "failed"
            if state == "cancelled" and getattr(e, "interrupted", False):
                err = errno.EINTR  # the writer was interrupted: it waits for EINTR (backupfs/jobs.py)
            return self._ended(s, state, str(e), err)
        except Exception as e:
            log.exception("%s failed", cmd.line())
            return self._ended(s, "failed", f"internal error: {type(e).__name__}: {e} (see the log)", errno.EIO)
        s.state, s.finished = "succeeded", time.time()
        log.info("%s: done", cmd.line())
        return 0, {**_outcome(s), **made}

    def _ended(self, s: ControlStatus, state: str, message: str, err: int) -> tuple[int, Outcome]:
        s.state, s.finished, s.error = state, time.time(), message
        s.errno = errno.errorcode.get(err, "EIO")
        log.info("%s: %s: %s", s.command, state, message)
        return err, _outcome(s)

    # -- device add ---------------------------------------------------------------------

    async def _add(self, cmd: DeviceAdd) -> Outcome:
        before = self.repo.device_record(cmd.name)
        if cmd.replace:
            self._check_idle(cmd.name, "rebinding its source")

        def add() -> Any:
            self._note_mount()
            if self.mountpoint is not None and not is_rbd(cmd.source):
                check_sources_outside(self.mountpoint, {cmd.name: cmd.source})
            ceph = {"ceph_conf": cmd.ceph_conf, "ceph_id": cmd.ceph_id}
            if cmd.replace:
                notes: list[str] = []
                rec = self.repo.replace_source(cmd.name, cmd.source, raw=cmd.raw, notes=notes, **ceph)
                for note in notes:  # the old image's snapshot left (a cluster out of reach)
                    log.warning("device %s: %s", cmd.name, note)
            else:
                rec = self.repo.add_device(cmd.name, cmd.source, cmd.granularity, raw=cmd.raw, compress=cmd.compress,
                                           **ceph)
            try:
                self.repo.device(cmd.name)  # opened now, as the mount opens each device at its start
            except BackupfsError as e:
                log.warning("device %s is unavailable: %s", cmd.name, e)
            return rec

        rec = await trio.to_thread.run_sync(add)
        await self.hooks.appeared(cmd.name)
        return {"device": {"name": rec.name, "source": rec.source, "size": rec.size,
                           "granularity": rec.granularity, "compress": rec.compress},
                "attached": before is not None and not before.source and not cmd.replace}

    # -- device set -----------------------------------------------------------------------

    async def _set(self, cmd: DeviceSet) -> Outcome:
        """A device's default compression: read by each backup as it starts,
        so a running job keeps what it began with."""
        rec = await trio.to_thread.run_sync(lambda: self.repo.set_device(cmd.name, compress=cmd.compress))
        return {"device": {"name": rec.name, "compress": rec.compress}}

    def _note_mount(self) -> None:
        """(In a worker: the loop answers the stat.) Tell the repository which
        filesystem is the mount, so that a source on it is refused by its
        identity, whatever path led there (a bind mount of it, say), not by
        the path alone (engine/repo.py: read by its own daemon, it hangs)."""
        if self.mountpoint is not None and self.repo.mount_dev is None:
            self.repo.mount_dev = os.stat(self.mountpoint).st_dev

    # -- device remove ----------------------------------------------------------------------

    async def _remove(self, cmd: DeviceRemove) -> Outcome:
        name = cmd.name
        if self.repo.device_record(name) is None:
            raise Refused(f"no device named {name!r}", errno.ENOENT)
        count = len(self.repo.backups(name))
        if count and not cmd.force:
            raise Refused(f"device {name} has {count} backup{'s' if count != 1 else ''}; removing it "
                          "deletes them all (use --force)", errno.EINVAL)
        self._check_idle(name, "removing it")
        # From here to the end no open of it can start (fs.py asks ``removing``);
        # nothing awaited between the check above and this line.
        self.removing.add(name)
        try:
            notes = await trio.to_thread.run_sync(self.repo.remove_device, name)
        finally:
            self.removing.discard(name)
            await self.hooks.removed(name)
        for note in notes:
            log.warning("device %s: %s", name, note)
        return {"removed": name, "backups_removed": count, "notes": notes}

    def _check_idle(self, name: str, doing: str) -> None:
        """Refuse ``doing`` to device ``name`` while a job or an open file uses it."""
        job = self.hooks.job_running(name)
        if job is not None:
            raise Refused(f"device {name} has a job running ({job}); wait for it, or interrupt it, before "
                          f"{doing}", errno.EBUSY)
        opened = self.hooks.open_files(name)
        if opened:
            shown = "; ".join(opened[:5]) + (f"; and {len(opened) - 5} more" if len(opened) > 5 else "")
            raise Refused(f"device {name} is in use in the mount: {shown}; close it before {doing}",
                          errno.EBUSY)

    # -- import -------------------------------------------------------------------------------

    async def _import(self, cmd: Import, requester: Requester | None) -> Outcome:
        from engine.repo import DEFAULT_GRANULARITY

        cancel = self._cancel = CancelRequest()

        def on_layer(n: int, total: int, path: str) -> None:
            if cancel.is_set():
                raise cancel.error("import")
            self.status.progress = f"importing {n + 1}/{total}: {path}"  # as the CLI says it unmounted

        def run() -> Any:
            self._note_mount()
            if self.mountpoint is not None:
                paths = {"tip": cmd.tip, **{f"--allow-outside {d}": d for d in cmd.allow_outside}}
                if cmd.source is not None:
                    paths["source"] = cmd.source
                _check_off_mount(self.mountpoint, paths)
            return self.repo.import_chain(
                cmd.name, cmd.tip, cmd.granularity or DEFAULT_GRANULARITY, cmd.source, on_layer,
                cmd.allow_outside, cmd.backing_format, cmd.tip_format, raw_source=cmd.raw)

        async def watch(requester: Requester) -> None:
            while not cancel.is_set():
                await trio.sleep(REQUESTER_POLL)
                sig = requester.stopping_signal()
                if sig is not None:
                    cancel.cancel(f"{requester.describe()} received {signal.Signals(sig).name}", interrupted=True)

        try:
            async with trio.open_nursery() as nursery:
                if requester is not None:
                    nursery.start_soon(watch, requester)
                result = await trio.to_thread.run_sync(outcome.capture, run)
                nursery.cancel_scope.cancel()
        finally:
            self._cancel = None
        records = result.unwrap()
        await self.hooks.appeared(cmd.name)
        return {"backups": [{"id": r.id, "kind": r.kind, "stored_bytes": r.stored_bytes, "label": r.label}
                            for r in records]}


def _check_off_mount(mountpoint: str, paths: dict[str, str]) -> None:
    """Refuse paths on the mount itself (what each is, -> path)."""
    mp = os.path.realpath(mountpoint)
    for what, path in paths.items():
        if os.path.commonpath([mp, os.path.realpath(path)]) == mp:
            raise Refused(f"{what} {path} lies on the backupfs mount at {mountpoint}; give a path outside it",
                          errno.EINVAL)


def _one_line(line: bytes, limit: int = 200) -> str:
    """A refused line as the status shows it: on one line, cut short."""
    text = one_line(line.strip().decode("utf-8", "backslashreplace"))
    return text if len(text) <= limit else text[:limit] + "..."


def _outcome(s: ControlStatus) -> Outcome:
    return {"state": s.state, "command": s.command, "error": s.error, "errno": s.errno}


def _failed(command: str, message: str, err: int) -> Outcome:
    """The outcome of a line refused before it ran (the status keeps the last real command)."""
    return {"state": "failed", "command": command, "error": message, "errno": errno.errorcode.get(err, "EIO")}
