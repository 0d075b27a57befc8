"""argparse flags generated from a config dataclass's fields: one flag per field, its --help
from the field's documentation (config.doc_field), booleans as --x/--no-x, tuples repeatable.
Every command that takes config options (serve, generate, eval, quantize) builds them here, so
each option and its default are written once, in the config."""

from __future__ import annotations

import argparse
import types
from typing import Any, Union, get_args, get_origin


def _arg_type(annotation: Any) -> Any:
    text = str(annotation)
    for name, kind in (("bool", bool), ("float", float), ("int", int), ("str", str)):
        if text.startswith(name) or f"{name} |" in text:
            return kind
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return str


def add_config_options(group, options: dict[str, tuple[str, Any, Any]], skip=frozenset()) -> None:
    """One flag per config field, its --help from the field's documentation."""
    for name, (text, default, annotation) in options.items():
        flag = "--" + name.replace("_", "-")
        text = text.replace("%", "%%")  # argparse formats help strings with %
        kind = _arg_type(annotation)
        if name in skip:
            continue
        if str(annotation).startswith("tuple"):
            group.add_argument(flag, action="append", default=None, help=text)
        elif kind is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default: {default})",
            )
        else:
            group.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default})")
