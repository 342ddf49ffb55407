"""The man page and the bash completion, generated from the argument parser.

scripts/install writes both (``python -m backupfs.shellfiles man|bash``):
made from ``build_parser()``, they name every subcommand, option and
positional the command has, so a new subcommand appears in them without an
edit anywhere. argparse-manpage and shtab are needed only here, at install
time: the ``docs`` extra in pyproject.toml, not a dependency of the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from backupfs.cli import PROG, _version, build_parser

MANUAL = "backupfs manual"

SEE_ALSO = """\
.SH SEE ALSO
.BR qemu\\-img (1),
.BR fusermount3 (1).
The README of backupfs documents the mounted tree, the snapshot trigger and
the JSON each \\fB\\-\\-json\\fR prints.
"""


def manpage() -> str:
    """backupfs(1) in roff: every subcommand's usage, arguments and options."""
    from argparse_manpage.manpage import Manpage

    parser = build_parser()
    page = Manpage(parser)
    page.description = (parser.description or "").rstrip(".")  # the NAME line's "backupfs - ..."
    page.source = f"{PROG} {_version()}"
    page.manual = MANUAL
    return str(page).rstrip("\n") + "\n" + SEE_ALSO


def bash_completion() -> str:
    """A bash script defining ``_shtab_backupfs`` and registering it for ``backupfs``."""
    import shtab

    return str(shtab.complete(build_parser(), shell="bash"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backupfs.shellfiles",
                                     description="print backupfs's man page or bash completion")
    parser.add_argument("what", choices=("man", "bash"), help="man: backupfs(1) in roff; bash: the completion")
    args = parser.parse_args(argv)
    sys.stdout.write(manpage() if args.what == "man" else bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
