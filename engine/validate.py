"""Checks on what users name things: labels and paths the catalog stores."""

from __future__ import annotations

import re

from engine.errors import UsageError

MAX_LABEL = 200
# A device's name: a directory under devices/ and a file name in the mount.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_label(label: str) -> str:
    """A backup's label: one printable line (`list` shows it in a column)."""
    if len(label) > MAX_LABEL or not label.isprintable():
        raise UsageError(f"label must be printable text of at most {MAX_LABEL} characters, on one line")
    return label


def utf8_path(path: str, what: str) -> str:
    """A path the catalog can store: it keeps paths as UTF-8 text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"{what} {path!r} is not valid UTF-8; the catalog keeps paths as UTF-8 text "
            "(rename it, or point a symlink with a UTF-8 name at it)"
        ) from None
    return path
