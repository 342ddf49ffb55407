"""The snapshot trigger's grammar: one line, ``KIND [key=value ...]``.

Pure parsing, so it can be fuzzed without a mount. Every refusal says what
was wrong and what is accepted, because the user only sees it through
``cat MOUNT/dev/snapshot`` after their ``echo`` failed with EINVAL.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from engine.errors import UsageError
from engine.catalog import KINDS
from engine.units import check_rate, parse_size
from engine.qcow2.format import COMPRESS_CHOICES
from engine.qcow2.writer import validate_cluster_size
from engine.validate import validate_label

MAX_LINE = 1024
KEYS = ("cluster_size", "label", "scan", "auto_full", "rate", "force", "empty", "compress")
PRUNE_KEYS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "remove", "dry_run")
USAGE = (
    "accepted: 'full|incremental|differential [cluster_size=64K] [label=TEXT] "
    "[scan=1] [auto_full=1] [rate=50M] [force=1] [empty=1] [compress=zstd|none]', 'verify [backup=ID]', or "
    "'prune keep_last=N|keep_daily=N|keep_weekly=N|keep_monthly=N|remove=ID [dry_run=1]'"
)


class TriggerError(UsageError):
    """A trigger line we refuse (EINVAL)."""


@dataclass(frozen=True)
class TriggerCommand:
    kind: str
    cluster_size: int = 64 * 1024
    label: str | None = None
    scan: bool = False
    auto_full: bool = False
    rate: int | None = None  # bytes per second, None = as fast as possible
    force: bool = False  # a full that may not fit the repository's disk is tried anyway
    empty: bool = False  # an empty layer when nothing changed (a point in time), not "nothing changed"
    compress: str | None = None  # "zstd" or "none"; None = the device's default

    def line(self) -> str:
        parts = [self.kind, f"cluster_size={self.cluster_size}"]
        if self.label is not None:
            parts.append("label=" + shlex.quote(self.label))
        if self.scan:
            parts.append("scan=1")
        if self.auto_full:
            parts.append("auto_full=1")
        if self.rate:
            parts.append(f"rate={self.rate}")
        if self.force:
            parts.append("force=1")
        if self.empty:
            parts.append("empty=1")
        if self.compress is not None:
            parts.append(f"compress={self.compress}")
        return " ".join(parts)


@dataclass(frozen=True)
class VerifyCommand:
    backup: str | None = None

    def line(self) -> str:
        return "verify" + (f" backup={self.backup}" if self.backup else "")


@dataclass(frozen=True)
class PruneCommand:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    remove: str | None = None
    dry_run: bool = False

    def line(self) -> str:
        parts = ["prune"]
        for key in PRUNE_KEYS:
            value = getattr(self, key)
            if value not in (None, False):
                parts.append(f"{key}={1 if value is True else value}")
        return " ".join(parts)


Command = TriggerCommand | VerifyCommand | PruneCommand


def _flag(key: str, value: str) -> bool:
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise TriggerError(f"{key}={value!r} is not a yes/no value (use {key}=1 or {key}=0)")


def parse_trigger(data: bytes) -> Command:
    """Parse one write to a snapshot file."""
    if len(data) > MAX_LINE:
        raise TriggerError(f"line of {len(data)} bytes is too long (max {MAX_LINE}); {USAGE}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TriggerError(f"line is not UTF-8 text; {USAGE}") from None
    if text.endswith("\r\n"):  # a script saved with DOS line ends
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if "\n" in text or "\r" in text:
        raise TriggerError(f"one command per write, got several lines; {USAGE}")
    if "\x00" in text:
        raise TriggerError(f"line contains a NUL byte; {USAGE}")
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise TriggerError(f"cannot parse {text!r}: {e}; {USAGE}") from None
    if not words:
        raise TriggerError(f"empty command; {USAGE}")
    kind = words[0]
    if kind == "verify":
        return _parse_verify(words[1:])
    if kind == "prune":
        return _parse_prune(words[1:])
    if kind not in KINDS:
        raise TriggerError(f"unknown backup kind {kind!r}; {USAGE}")
    opts: dict[str, object] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise TriggerError(f"{word!r} is not key=value; {USAGE}")
        if key not in KEYS:
            raise TriggerError(f"unknown key {key!r}; {USAGE}")
        if key in opts:
            raise TriggerError(f"{key} given twice; {USAGE}")
        if key == "cluster_size":
            try:
                size = parse_size(value, "cluster_size")
                validate_cluster_size(size)
            except UsageError as e:
                raise TriggerError(f"{e}; accepted: a power of two from 512 to 2M, e.g. cluster_size=128K") from None
            opts[key] = size
        elif key == "label":
            try:
                opts[key] = validate_label(value)
            except UsageError as e:
                raise TriggerError(str(e)) from None
        elif key in ("scan", "auto_full", "force", "empty"):
            opts[key] = _flag(key, value)
        elif key == "compress":
            if value not in COMPRESS_CHOICES:
                raise TriggerError(f"compress={value!r} is not a compression; accepted: compress=zstd or compress=none")
            opts[key] = value
        else:  # rate
            try:
                rate = parse_size(value, "rate")
            except UsageError as e:
                raise TriggerError(f"{e}; accepted: bytes per second, e.g. rate=50M") from None
            try:
                opts[key] = check_rate(rate)
            except UsageError as e:
                raise TriggerError(str(e)) from None
    return TriggerCommand(kind, **opts)  # type: ignore[arg-type]


def _pairs(words: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise TriggerError(f"{word!r} is not key=value; {USAGE}")
        if key not in keys:
            raise TriggerError(f"unknown key {key!r}; {USAGE}")
        if key in out:
            raise TriggerError(f"{key} given twice; {USAGE}")
        out[key] = value
    return out


def _parse_verify(words: list[str]) -> VerifyCommand:
    opts = _pairs(words, ("backup",))
    return VerifyCommand(opts.get("backup") or None)


def _parse_prune(words: list[str]) -> PruneCommand:
    opts = _pairs(words, PRUNE_KEYS)
    values: dict[str, object] = {}
    for key, value in opts.items():
        if key == "remove":
            values[key] = value
        elif key == "dry_run":
            values[key] = _flag(key, value)
        else:
            if not value.isdigit() or int(value) < 1:
                raise TriggerError(f"{key}={value!r} must be a whole number of at least 1")
            values[key] = int(value)
    cmd = PruneCommand(**values)  # type: ignore[arg-type]
    rules = [cmd.keep_last, cmd.keep_daily, cmd.keep_weekly, cmd.keep_monthly]
    if (cmd.remove is None) == all(r is None for r in rules):
        raise TriggerError(f"prune needs either keep_* rules or remove=ID; {USAGE}")
    return cmd
