"""The command line as a newcomer meets it: `evomerge` alone, `--help`, and each command's help."""

from __future__ import annotations

import pytest

from evomerge.cli import COMMANDS, main

SCREEN = (80, 24)  # columns, lines


@pytest.fixture(autouse=True)
def _terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(SCREEN[0]))


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_evomerge_alone_prints_the_two_first_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = lines.index("  evomerge run experiments/quickstart.yaml")
    assert lines[first + 2] == "  evomerge ui runs/<run-id>"  # then watch that run
    assert len(lines) < SCREEN[1]


@pytest.mark.parametrize("command", [*sorted(COMMANDS), "zoo build"])
def test_every_help_fits_one_screen_with_one_example(capsys, command):
    out = _help(capsys, *command.split())
    lines = out.rstrip("\n").splitlines()
    assert len(lines) < SCREEN[1], out
    assert max(map(len, lines)) <= SCREEN[0] or "example:" in out.split(max(lines, key=len))[0], out
    assert out.count("example:") == 1
    example = lines[lines.index("example:") + 1].strip()
    assert example.startswith(f"evomerge {command.split()[0]}"), example


def test_top_level_help_lists_every_command(capsys):
    out = _help(capsys)
    assert len(out.splitlines()) < SCREEN[1]
    for command in COMMANDS:
        assert f"\n    {command} " in out, command
