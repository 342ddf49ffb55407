"""The repository control file's grammar: what `device add|remove` and `import`
ask a mount's daemon to do, as one line written to ``MOUNT/.control``.

A mounted repository is the daemon's (it holds the lock), so commands that
change which devices it has are done by the daemon, as backups and prunes
are through a device's snapshot file. Those are device-level; these are
repository-level, hence one file at the root, named with a dot so that it
can never be a device (device names start with a letter or digit) and is
left out of the root's listing (scripts walk MOUNT/* as the devices).

One line ending in a newline, shell-quoted words: a verb, its positional
words, then ``key=value`` options::

    device-add NAME SOURCE [granularity=BYTES] [raw=1] [replace=1] [compress=zstd|none]
               [ceph_conf=PATH] [ceph_id=ID]          (SOURCE a path, or rbd:POOL/[NS/]IMAGE)
    device-set NAME compress=zstd|none
    device-remove NAME [force=1]
    import NAME TIP [source=PATH] [granularity=BYTES] [allow_outside=DIR]...
           [backing_format=raw|qcow2] [format=raw|qcow2] [raw=1]

Paths must be absolute: the daemon's working directory is not the
caller's. Pure parsing, so it can be tested without a mount; the daemon
side is backupfs/repocontrol.py, the CLI side backupfs/cli_control.py.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from engine.ceph import is_rbd
from engine.errors import UsageError
from engine.qcow2.format import COMPRESS_CHOICES
from engine.validate import NAME_RE, utf8_path

CONTROL_NAME = ".control"
# Paths can be long (PATH_MAX each); a line holds a few of them.
MAX_LINE = 64 * 1024
FORMATS = ("raw", "qcow2")
USAGE = (
    "accepted: 'device-add NAME SOURCE [granularity=BYTES] [raw=1] [replace=1] [compress=zstd|none] "
    "[ceph_conf=PATH] [ceph_id=ID]', "
    "'device-set NAME compress=zstd|none', 'device-remove NAME [force=1]', or 'import NAME TIP [source=PATH] [granularity=BYTES] "
    "[allow_outside=DIR]... [backing_format=raw|qcow2] [format=raw|qcow2] [raw=1]' (absolute paths)"
)


class ControlError(UsageError):
    """A control line we refuse (EINVAL)."""


@dataclass(frozen=True)
class DeviceAdd:
    name: str
    source: str
    granularity: int | None = None
    raw: bool = False
    replace: bool = False
    compress: str | None = None  # None: "none" for a new device, an attach keeps the device's
    ceph_conf: str | None = None  # an rbd: source's cluster (engine/ceph.py)
    ceph_id: str | None = None

    def line(self) -> str:
        words = ["device-add", self.name, self.source]
        words += [f"{k}={v}" for k, v in (("ceph_conf", self.ceph_conf), ("ceph_id", self.ceph_id)) if v]
        if self.granularity is not None:
            words.append(f"granularity={self.granularity}")
        words += [f"{k}=1" for k in ("raw", "replace") if getattr(self, k)]
        if self.compress is not None:
            words.append(f"compress={self.compress}")
        return shlex.join(words)


@dataclass(frozen=True)
class DeviceSet:
    name: str
    compress: str

    def line(self) -> str:
        return shlex.join(["device-set", self.name, f"compress={self.compress}"])


@dataclass(frozen=True)
class DeviceRemove:
    name: str
    force: bool = False

    def line(self) -> str:
        return shlex.join(["device-remove", self.name] + (["force=1"] if self.force else []))


@dataclass(frozen=True)
class Import:
    name: str
    tip: str
    source: str | None = None
    granularity: int | None = None
    allow_outside: tuple[str, ...] = field(default_factory=tuple)
    backing_format: str | None = None
    tip_format: str = "qcow2"
    raw: bool = False

    def line(self) -> str:
        words = ["import", self.name, self.tip]
        if self.source is not None:
            words.append(f"source={self.source}")
        if self.granularity is not None:
            words.append(f"granularity={self.granularity}")
        words += [f"allow_outside={d}" for d in self.allow_outside]
        if self.backing_format is not None:
            words.append(f"backing_format={self.backing_format}")
        if self.tip_format != "qcow2":
            words.append(f"format={self.tip_format}")
        if self.raw:
            words.append("raw=1")
        return shlex.join(words)


ControlCommand = DeviceAdd | DeviceSet | DeviceRemove | Import

# verb -> (positional words, option keys)
_VERBS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "device-add": (("NAME", "SOURCE"), ("granularity", "raw", "replace", "compress", "ceph_conf", "ceph_id")),
    "device-set": (("NAME",), ("compress",)),
    "device-remove": (("NAME",), ("force",)),
    "import": (("NAME", "TIP"), ("source", "granularity", "allow_outside", "backing_format", "format", "raw")),
}
_REPEATABLE = ("allow_outside",)


def _flag(key: str, value: str) -> bool:
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ControlError(f"{key}={value!r} is not a yes/no value (use {key}=1 or {key}=0)")


def _absolute(value: str, what: str) -> str:
    if not os.path.isabs(value):
        raise ControlError(f"{what} {value!r} is not an absolute path (the daemon's working directory "
                           "is not yours); " + USAGE)
    try:
        return utf8_path(os.path.normpath(value), what)
    except UsageError as e:
        raise ControlError(str(e)) from None


def _granularity(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ControlError(f"granularity={value!r} must be a number of bytes")
    return int(value)


def _format(key: str, value: str) -> str:
    if value not in FORMATS:
        raise ControlError(f"{key}={value!r}: accepted: {', '.join(FORMATS)}")
    return value


def _compress(value: str) -> str:
    if value not in COMPRESS_CHOICES:
        raise ControlError(f"compress={value!r}: accepted: {', '.join(COMPRESS_CHOICES)}")
    return value


def parse_control(data: bytes) -> ControlCommand:
    """Parse one write to the control file; ControlError says what was wrong."""
    if len(data) > MAX_LINE:
        raise ControlError(f"line of {len(data)} bytes is too long (max {MAX_LINE})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError(f"line is not UTF-8 text; {USAGE}") from None
    if not text.endswith("\n"):
        # The kernel splits a write longer than the mount's largest request:
        # the first part would name a shorter path. A line is run whole or not.
        raise ControlError(f"a command is one line ending in a newline (echo adds one); {USAGE}")
    text = text[:-1]
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ControlError(f"one command per write, on one line, without NUL bytes; {USAGE}")
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ControlError(f"cannot parse the line: {e}; {USAGE}") from None
    if not words or words[0] not in _VERBS:
        raise ControlError(f"unknown command {words[0] if words else ''!r}; {USAGE}")
    verb, rest = words[0], words[1:]
    positional, keys = _VERBS[verb]
    # The positional words come first, whatever they hold: a path may have
    # '=' in it (an option in their place fails as no NAME or no absolute path).
    if len(rest) < len(positional):
        raise ControlError(f"{verb} needs {' '.join(positional)}; {USAGE}")
    args, opts = rest[: len(positional)], rest[len(positional):]
    values: dict[str, list[str]] = {}
    for word in opts:
        key, sep, value = word.partition("=")
        if not sep or key not in keys:
            raise ControlError(f"{verb}: unknown option {word!r}; {USAGE}")
        if key in values and key not in _REPEATABLE:
            raise ControlError(f"{verb}: {key} given twice")
        values.setdefault(key, []).append(value)
    one = {k: v[0] for k, v in values.items()}
    name = args[0]
    if not NAME_RE.fullmatch(name):
        raise ControlError(f"invalid device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    if verb == "device-add":
        source = args[1] if is_rbd(args[1]) else _absolute(args[1], "source")
        return DeviceAdd(name, source,
                         _granularity(one["granularity"]) if "granularity" in one else None,
                         _flag("raw", one.get("raw", "0")), _flag("replace", one.get("replace", "0")),
                         _compress(one["compress"]) if "compress" in one else None,
                         _absolute(one["ceph_conf"], "ceph_conf") if "ceph_conf" in one else None,
                         one.get("ceph_id"))
    if verb == "device-set":
        if "compress" not in one:
            raise ControlError(f"device-set needs compress=zstd|none; {USAGE}")
        return DeviceSet(name, _compress(one["compress"]))
    if verb == "device-remove":
        return DeviceRemove(name, _flag("force", one.get("force", "0")))
    return Import(
        name, _absolute(args[1], "tip"),
        source=_absolute(one["source"], "source") if "source" in one else None,
        granularity=_granularity(one["granularity"]) if "granularity" in one else None,
        allow_outside=tuple(_absolute(d, "allow_outside") for d in values.get("allow_outside", [])),
        backing_format=_format("backing_format", one["backing_format"]) if "backing_format" in one else None,
        tip_format=_format("format", one.get("format", "qcow2")),
        raw=_flag("raw", one.get("raw", "0")),
    )
