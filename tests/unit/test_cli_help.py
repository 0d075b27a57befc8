"""Every `tokenmill ... --help` renders (argparse expands % in help strings, so one stray % in an
option's documentation would crash --help of every command that has the option)."""

from __future__ import annotations

import argparse

from tokenmill.cli import build_parser


def parsers(parser: argparse.ArgumentParser, path: str = "tokenmill"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def test_every_help_renders():
    seen = []
    for path, parser in parsers(build_parser()):
        text = parser.format_help()
        assert "usage:" in text, path
        seen.append(path)
    assert {"tokenmill serve", "tokenmill quantize", "tokenmill eval perplexity"} <= set(seen)
    serve = dict(parsers(build_parser()))["tokenmill serve"].format_help()
    assert "--rotation-search" in serve and "1% perplexity" in serve
