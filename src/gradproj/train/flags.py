"""Command-line flags generated from a config's fields (:func:`gradproj.options.option`): each field
is one flag with its help, type, choices and default, in its ``--help`` section; a nested config
(the optimizer) contributes its own fields. Flags default to "not given", so ``--resume RUN``
continues with the run's saved settings and a flag that contradicts them is named in the error.

Example:
    >>> import argparse
    >>> from gradproj.train.config import PretrainConfig
    >>> parser = argparse.ArgumentParser()
    >>> _ = add_config_flags(parser, PretrainConfig)
    >>> given(parser.parse_args(["--optimizer", "fira_adamw", "--rank", "8", "--steps", "5", "--no-progress"]))
    {'optim': {'name': 'fira_adamw', 'rank': 8}, 'steps': 5, 'progress': False}
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from ..options import meta, resolve
from .config import SECTIONS


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, planned: bool = False) -> dict[str, Any]:
    """Add one flag per described field of the dataclass ``cls`` (recursing into nested configs);
    returns the argument groups by section name, so a command can add flags of its own. ``planned``:
    only the fields that change what a run holds in memory (``gradproj memory``'s flags; a nested
    config marked so contributes all of its fields)."""
    groups = {name: parser.add_argument_group(name) for name in SECTIONS}
    _add_fields(groups, cls, cls(), prefix="", planned=planned)
    return groups


def _add_fields(groups: dict[str, Any], cls: type, defaults: Any, prefix: str, planned: bool) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        info, default = meta(cls, f.name), getattr(defaults, f.name)
        if not info or (planned and not info.get("planned")):
            continue
        if dataclasses.is_dataclass(default):  # a nested config: its fields are flags of their own
            _add_fields(groups, type(default), default, prefix=f"{prefix}{f.name}.", planned=False)
            continue
        name = f.name.replace("_", "-")
        kind = _scalar(hints[f.name])
        text = str(resolve(info["help"]))
        added = getattr(cls, "FIELD_HELP", {}).get(f.name)
        text += f" ({added})" if added else ""
        options: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": argparse.SUPPRESS}
        if kind is bool:
            flag = info["flag"] or (f"--no-{name}" if default else f"--{name}")
            options["action"] = "store_false" if default else "store_true"
        else:
            flag = info["flag"] or f"--{name}"
            options["type"], options["metavar"] = (
                flag_type(info["parse"]) if info.get("parse") else kind,
                f.name.upper(),
            )
            choices = resolve(info["choices"])
            if choices is not None:
                options["choices"], options["metavar"] = choices, None
            if default is not None and "(default" not in text:  # a help may say the default in its own words
                text += f" (default {default})"
        groups[info["group"]].add_argument(flag, help=text.replace("%", "%%"), **options)


def flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: its ValueError's own words become the flag's error (argparse would
    otherwise print ``invalid parse_gap value``).

    >>> from gradproj.optim.adaptive import parse_gap
    >>> flag_type(parse_gap)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: '0' is not valid; expected an integer >= 1 or 'auto'
    """

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    read.__name__ = parse.__name__
    return read


def _scalar(hint: Any) -> type:
    """The command-line type of a field: bool, int, float or str (of ``int | None``, ``str | list``...)."""
    members = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    for kind in (bool, int, float, str):
        if kind in members:
            return kind
    return str


#: what ``gradproj``'s top-level parser puts in every namespace (the command's name and what runs it): no setting
COMMAND_KEYS = ("command", "run")


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The flags actually given, as a nested config dict (``optim.lr`` -> ``{"optim": {"lr": ...}}``)."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in COMMAND_KEYS:
            continue
        *parents, last = dest.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return out
