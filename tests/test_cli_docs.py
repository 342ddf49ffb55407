"""--help, the man page and the bash completion: all made from one parser.

Each is checked the way a person meets it: `backupfs CMD --help` run as a
command, the man page rendered by man/groff, the completion sourced into a
real bash and asked to complete what a user typed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from backupfs.cli import build_parser
from backupfs.cli_help import positionals_without_help
from tests.commands import cli, sh

INSTALLED_MAN = Path("/usr/local/share/man/man1/backupfs.1")
INSTALLED_COMPLETION = Path("/usr/share/bash-completion/completions/backupfs")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every subcommand path: ('init',), ('device', 'add'), ..."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*path, name))
                out += _commands(sub, (*path, name))
    return out


def _generated(what: str) -> str:
    return subprocess.run([sys.executable, "-m", "backupfs.shellfiles", what], check=True,
                          capture_output=True, text=True).stdout


def test_every_positional_of_every_subcommand_has_help() -> None:
    assert positionals_without_help(build_parser()) == []


def test_help_describes_positionals_and_lists_kind_choices() -> None:
    out = cli("backup", "--help").stdout.decode()
    positionals = out.split("positional arguments:")[1].split("options:")[0]
    assert "REPO " in positionals and "the repository directory" in positionals
    assert "full, incremental" in " ".join(positionals.split()) and "differential" in positionals
    assert "SOURCE" in cli("device", "add", "--help").stdout.decode().split("positional arguments:")[1]


def test_a_positional_without_help_is_found() -> None:
    """The walk above would catch a subcommand added with a bare positional."""
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers()
    sub.add_parser("new").add_argument("thing", metavar="THING")
    assert positionals_without_help(parser) == ["new THING"]


def test_man_page_renders_every_subcommand(tmp_path: Path) -> None:
    page = tmp_path / "backupfs.1"
    page.write_text(_generated("man"))
    # groff's own warnings (-ww) about the roff itself: none.
    checked = sh(f"groff -man -Tutf8 -ww -z {page}")
    assert checked.stderr == ""
    text = sh(f"MANWIDTH=100 man -l {page} | col -b").stdout
    assert text.startswith("BACKUPFS(1)")
    assert "backupfs - Incremental backup chains" in text
    for words in _commands(build_parser()):
        assert f"backupfs {' '.join(words)}" in text, words
    # A positional's help text and KIND's choices made it into the page.
    assert "the kind of backup; one of: full, incremental, differential" in " ".join(text.split())


def _complete(script: Path, line: str) -> list[str]:
    """What bash offers for TAB at the end of ``line`` (words split as bash would)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    array = " ".join(shlex.quote(w) for w in words)
    out = sh(
        f"source {shlex.quote(str(script))}; COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; "
        f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}; "
        f"$(complete -p backupfs | sed -E 's/.* -F ([^ ]+) .*/\\1/') backupfs; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    ).stdout
    return out.split()


def test_bash_completion_completes_subcommands_options_and_kinds(tmp_path: Path) -> None:
    script = tmp_path / "backupfs"
    script.write_text(_generated("bash"))
    assert "-F _shtab_backupfs backupfs" in sh(f"source {script}; complete -p backupfs").stdout
    top = _complete(script, "backupfs ")
    assert {"init", "device", "backup", "list", "status", "verify", "prune", "mount", "image"} <= set(top)
    assert _complete(script, "backupfs ver") == ["verify"]
    assert _complete(script, "backupfs device ") == ["add", "set", "list", "remove"]
    assert _complete(script, "backupfs backup repo vm1 ") == ["full", "incremental", "differential"]
    assert "--json" in _complete(script, "backupfs list --")
    # REPO offers directories, SOURCE files too.
    (tmp_path / "repo").mkdir()
    (tmp_path / "disk.img").write_bytes(b"")
    assert _complete(script, f"backupfs list {tmp_path}/") == [f"{tmp_path}/repo"]
    assert f"{tmp_path}/disk.img" in _complete(script, f"backupfs device add {tmp_path}/repo vm1 {tmp_path}/")


@pytest.mark.parametrize("installed", [INSTALLED_MAN, INSTALLED_COMPLETION])
def test_scripts_install_put_them_in_place(installed: Path) -> None:
    """What scripts/install wrote (as root) is there and works."""
    assert installed.is_file(), f"{installed} is missing: run scripts/install as root"
    if installed == INSTALLED_MAN:
        assert sh("MANWIDTH=80 man backupfs | col -b").stdout.startswith("BACKUPFS(1)")
    else:
        assert _complete(installed, "backupfs device ") == ["add", "set", "list", "remove"]
