"""The command lines the README and the guides show are ones `vigie` accepts: docs that drift from the CLI fail."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO
from vigie.cli import _parser

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_COMMAND = re.compile(r"^(?:sudo )?(?:\S*/)?vigie (.+)$")


def _usable(line: str) -> str | None:
    """The arguments of a `vigie ...` line, unless it holds a placeholder (`<address>`, `...`)."""
    command = line.split("#", 1)[0].strip()
    match = _COMMAND.match(command)
    if match is None or any(mark in command for mark in ("<", "...", "…")):
        return None
    return match.group(1)


def commands_in_blocks(text: str) -> list[str]:
    found, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside and (args := _usable(line.strip())):
            found.append(args)
    return found


def commands_inline(text: str) -> list[str]:
    return [args for code in re.findall(r"`([^`\n]+)`", text) if (args := _usable(code))]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_every_vigie_command_shown_is_one_vigie_accepts(document: Path) -> None:
    text = document.read_text()
    complete, named = commands_in_blocks(text), commands_inline(text)
    if document.name in ("README.md", "guide-admin.fr.md", "rules.md", "deploy.md"):
        assert len(complete) + len(named) >= 5, f"{document.name}: too few commands found: {complete + named}"
    parser = _parser()
    for command in complete:  # whole command lines: they parse
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"{document.name}: `vigie {command}` is not a command vigie accepts")
    for command in named:  # commands named in the text: the command (and its action) exist
        level = parser
        for word in shlex.split(command):
            choices = subcommands(level)
            if not choices or word.startswith("-"):
                break
            assert word in choices, f"{document.name}: `vigie {command}`: no {word!r} (known: {', '.join(choices)})"
            level = choices[word]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_every_link_to_a_file_of_the_repository_leads_somewhere(document: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
        if "://" not in target:
            assert (document.parent / target).exists(), f"{document.name}: {target} does not exist"


def test_the_readme_is_short_and_says_the_two_commands_first() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert first_block.startswith("make run") and "\nmake test" in first_block
