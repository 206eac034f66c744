"""Options must be spelled out: an abbreviation (``--psk-he`` for ``--psk-hex``) is refused by
every command, so a script keeps its meaning when a later release adds a longer option."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from kms.cli import build_parser


def _parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_parser_refuses_abbreviations() -> None:
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 40  # every sub-command was walked
    assert [p.prog for p in parsers if p.allow_abbrev] == []


@pytest.mark.parametrize("argv", [
    ["endpoint", "add", "sip:a@example.org", "--psk-he", "ab" * 16],
    ["endpoint", "list", "--js"],
    ["--ho", "/tmp/x", "status"],
])
def test_an_abbreviated_option_is_an_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2  # usage error (with abbreviations allowed, these parsed)


def test_the_full_option_still_parses() -> None:
    args = build_parser().parse_args(
        ["endpoint", "add", "sip:a@example.org", "--psk-hex", "ab" * 16]
    )
    assert args.psk_hex == "ab" * 16
