"""Showing text that came from outside: file names, labels, paths, messages.

A label or a backing file name is whatever an image or a user made it. Printed
as it is, a newline in it forges a row of `list` or a line of the log, an
ESC sequence rewrites the operator's terminal, a bidi override makes a name
read backwards. Everything such text goes through on its way out is here,
one rule for all: control characters (C0, DEL, C1), bidi and line-separator
characters and anything else Unicode calls unprintable are shown as escapes
(\\n, \\t, \\r, else \\xNN, \\uNNNN, \\UNNNNNNNN); a byte of a name that
was not UTF-8 (decoded with surrogateescape) as the \\xNN of that byte.
"""

from __future__ import annotations

_SHORT = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(ch: str) -> str:
    """The escape of one unprintable character."""
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a non-UTF-8 name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """A field (a label, a name, a path) as one printable line, unambiguous:
    backslashes are doubled, so an escape in the output always means an
    unprintable character in the text, never the four characters ``\\x1b``."""
    if text.isprintable() and "\\" not in text:
        return text  # nearly always: no copy
    return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else _escape_char(ch) for ch in text)


def one_line(text: str) -> str:
    """A whole message (an error, a log line) as one printable line.

    The last guard before a terminal or a log file, for messages put
    together from fields (some already quoted with repr or ``escape``):
    backslashes are left alone so that those are not escaped twice; every
    unprintable character is escaped, so no message spans two lines.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)
