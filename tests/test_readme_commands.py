"""Every `geopipe …` command line in the README's shell blocks names a real command and only
options that command has (the README drifts otherwise; running them all is the demo's job)."""

from __future__ import annotations

import os
import re
import shlex

import click
import pytest

from geopipe.flows.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command_lines() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                part = re.sub(r"^(?:do|then|cd \S+)\s+", "", part.strip())
                if part.startswith("geopipe "):
                    lines.append(part)
    return lines


def _options(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}


LINES = _command_lines()


def test_the_readme_has_command_lines():
    assert len(LINES) > 30


@pytest.mark.parametrize("line", LINES)
def test_readme_command_line_uses_real_commands_and_options(line):
    tokens = shlex.split(line.replace("$", "X"))[1:]
    command: click.Command = cli
    while tokens and tokens[0].startswith("-"):  # global options
        opt = tokens.pop(0).split("=", 1)[0]
        assert opt in _options(cli), f"{line}: geopipe has no global option {opt}"
        if opt == "--threads":
            tokens.pop(0)
    while isinstance(command, click.Group):
        assert tokens, f"{line}: no command"
        name = tokens.pop(0)
        assert name in command.commands, f"{line}: no command {name!r}"
        command = command.commands[name]
    known = _options(command) | {"--help", "-h"}
    for tok in tokens:
        if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok):
            opt = tok.split("=", 1)[0]
            assert opt in known, f"{line}: `geopipe … {command.name}` has no option {opt}"
