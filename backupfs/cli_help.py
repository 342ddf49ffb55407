"""Help for positional arguments, filled in once for every subcommand.

The same words (REPO, NAME, ID, ...) appear in a dozen subcommands; saying
what each means in one table keeps `--help`, the man page and the shell
completion (all generated from the parser) in step, and a new subcommand
that uses them is described without an edit here. A positional whose help
its module already gives keeps it. The completion hints are the plain
dictionaries shtab reads from ``action.complete``, so that the command
itself does not import shtab.
"""

from __future__ import annotations

import argparse

# Files and directories, as the generated bash completion offers them.
_FILES = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIRS = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}

# By metavar: what the word means wherever it appears.
_BY_METAVAR: dict[str, tuple[str, dict[str, str] | None]] = {
    "REPO": ("the repository directory (made by 'backupfs init')", _DIRS),
    "NAME": ("the device's name in the repository", None),
    "DEVICE": ("the device's name in the repository", None),
    "SOURCE": ("the raw disk to back up: an image file or a block device", _FILES),
    "KIND": ("the kind of backup", None),
    "ID": ("a backup id, 'latest', or a unique suffix of an id after its timestamp (0002, 0002-incremental)",
           None),
    "MOUNTPOINT": ("the directory the repository is mounted on", _DIRS),
    "TIP": ("the newest image of a qcow2 chain (its backing files are followed)", _FILES),
    "IMG": ("one qcow2 image (its backing files are not read)", _FILES),
    "TARGET": ("where the backup is written", _FILES),
    "PATH": ("a volume and a path in it, e.g. p2/etc", None),
}

# Where one command means more than the word says.
_BY_COMMAND: dict[tuple[str, str], str] = {
    ("mount", "MOUNTPOINT"): "an empty directory to mount the repository on",
    ("umount", "MOUNTPOINT"): "where a repository is mounted",
    ("import", "TIP"): "the newest image of the qcow2 chain to adopt (its backing files are followed)",
    ("init", "REPO"): "the directory to create the repository in (new, or empty)",
    ("device add", "NAME"): "the name to give the device: letters, digits, '.', '_' and '-', at most 64",
    ("list", "NAME"): "only this device's backups (default: every device's)",
    ("verify", "NAME"): "only this device's backups (default: every device's)",
}


def _choices_text(action: argparse.Action) -> str:
    """`one of: full, incremental, differential`: a metavar hides argparse's {a,b,c}."""
    return "one of: " + ", ".join(str(c) for c in action.choices or ())


def describe_positionals(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Give every positional of ``parser`` and its subcommands help text, list
    the choices of one that has them, and attach completion hints."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                describe_positionals(sub, (*path, name))
            continue
        if action.option_strings:
            continue
        metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        default, complete = _BY_METAVAR.get(metavar, (None, None))
        if action.help is None:
            action.help = _BY_COMMAND.get((" ".join(path), metavar), default)
        if action.choices and action.help is not None and "one of:" not in action.help:
            action.help = f"{action.help}; {_choices_text(action)}"
        elif action.choices and action.help is None:
            action.help = _choices_text(action)
        if complete is not None and not hasattr(action, "complete"):
            action.complete = complete  # type: ignore[attr-defined]


def positionals_without_help(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[str]:
    """`backupfs device add SOURCE`: each positional that --help would leave undescribed."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += positionals_without_help(sub, (*path, name))
        elif not action.option_strings and not action.help:
            missing.append(" ".join((*path, str(action.metavar or action.dest))))
    return missing
