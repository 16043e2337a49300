"""The command tree: every subcommand is parsed by argparse and names the function that runs it."""

from __future__ import annotations

import argparse

import pytest

from proxy.cli import _FirstWord, _parser, main

pytestmark = pytest.mark.unit


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every runnable command line prefix and the parser that ends it (through subcommands and shred's forms)."""
    branches = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction | _FirstWord)]
    if not branches:
        yield path, parser
    for action in branches:
        if isinstance(action, _FirstWord):
            yield from _leaves(action.fallback, (*path, "Patient/x"))
            for word, sub in action.parsers.items():
                yield from _leaves(sub, (*path, word))
        else:
            for word, sub in action.choices.items():
                yield from _leaves(sub, (*path, word))


def test_every_command_dispatches_through_set_defaults():
    leaves = dict(_leaves(_parser()))
    assert ("shred", "hold", "add") in leaves and ("shred", "Patient/x") in leaves and ("keys", "retire") in leaves
    for path, parser in leaves.items():
        assert callable(parser.get_default("func")), path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["shred"], "expected Patient/<id> | hold"),
        (["shred", "hold"], "hold_command"),
        (["shred", "hold", "purge", "Patient/x"], "invalid choice: 'purge'"),
        (["shred", "hold", "add"], "Patient/<id>"),
        (["shred", "hold", "list", "--until", "2030-01-01"], "unrecognized arguments: --until"),
        (["shred", "Patient/x", "Patient/y"], "unrecognized arguments: Patient/y"),
    ],
)
def test_shred_forms_are_parsed_not_guessed(argv, message, capsys):
    """A malformed shred line is a usage error (exit 2) before any keyring or store is opened."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_shred_forms_parse_their_own_options():
    args = _parser().parse_args(
        ["shred", "hold", "add", "Patient/a", "--until", "2030-01-01", "--reason", "litigation"]
    )
    assert (args.patient, args.until, args.reason, args.hold_command) == (
        "Patient/a",
        "2030-01-01",
        "litigation",
        "add",
    )
    args = _parser().parse_args(["shred", "Patient/b", "--by", "dpo"])
    assert (args.patient, args.by, args.reason) == ("Patient/b", "dpo", None)
