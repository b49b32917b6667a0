"""Options that describe themselves: one dataclass field carries its default, help, limits, choices,
command-line flag, help group and whether a resumed run may change it. Configs validate from it
(:func:`check`), the command line is generated from it (:mod:`gradproj.train.flags`), and resume
compares configs with it, so a setting is written once.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Run:
    ...     steps: int = option(10, help="optimizer steps", minimum=1)
    ...     mode: str = option("fast", help="how", choices=("fast", "slow"))
    ...     def __post_init__(self) -> None:
    ...         check(self)
    >>> Run(steps=0)
    Traceback (most recent call last):
    ...
    ValueError: steps=0 is not valid; expected an integer >= 1
    >>> Run(mode="warp")
    Traceback (most recent call last):
    ...
    ValueError: mode='warp' is not valid; expected one of fast, slow
    >>> meta(Run, "steps")["help"]
    'optimizer steps'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str | Callable[[], str],
    default_factory: Callable[[], Any] = _NO_DEFAULT,
    minimum: float | None = None,
    above: float | None = None,
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None,
    flag: str | None = None,
    group: str | None = None,
    resumable: bool = False,
    planned: bool = False,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field with its own description.

    ``help`` (a string, or a function for text drawn from a registry), ``minimum`` (inclusive) or
    ``above`` (exclusive) bounds, ``choices`` (a tuple, or a function returning one: the command
    line's choices; validation uses them too unless the owner validates itself), ``flag`` (the
    command-line name, default ``--field-name``), ``group`` (the ``--help`` section) and
    ``resumable`` (``--resume`` may change it) and ``planned`` (``gradproj memory`` takes the same flag:
    it changes what the run holds in memory) and ``parse`` (how the command line reads a value that is
    not one plain type, such as an int or ``"auto"``; the owner then validates the value itself).
    ``None`` values skip the checks: None means "the default of whoever resolves it".
    """
    metadata = {
        "help": help,
        "minimum": minimum,
        "above": above,
        "choices": choices,
        "flag": flag,
        "group": group,
        "resumable": resumable,
        "planned": planned,
        "parse": parse,
    }
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def meta(cls: type, name: str) -> Mapping[str, Any]:
    """The option metadata of field ``name`` of ``cls``: its own, or that of the nearest base class
    that describes it (a subclass may change a default without repeating the help)."""
    for klass in cls.__mro__:
        found = getattr(klass, "__dataclass_fields__", {}).get(name)
        if found is not None and found.metadata:
            return found.metadata
    return {}


def resolve(value: Any) -> Any:
    """``value``, or what it returns if it is a function (help and choices drawn from a registry)."""
    return value() if callable(value) else value


def check(obj: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Validate every described field of the dataclass instance ``obj`` (but ``skip``); the error
    names the field, its value and what would be valid."""
    for f in dataclasses.fields(obj):
        info, value = meta(type(obj), f.name), getattr(obj, f.name)
        if f.name in skip or not info or value is None:
            continue
        choices = resolve(info["choices"])
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name}={value!r} is not valid; expected one of {', '.join(map(str, choices))}")
        if info["minimum"] is not None and not value >= info["minimum"]:
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ValueError(f"{f.name}={value!r} is not valid; expected {kind} >= {info['minimum']:g}")
        if info["above"] is not None and not value > info["above"]:
            raise ValueError(f"{f.name}={value!r} is not valid; expected a number > {info['above']:g}")


def integer_at_least(key: str, value: Any, low: int) -> None:
    """Refuse ``value`` for setting ``key`` unless it is an int (not a bool) >= ``low``, naming both.

    >>> integer_at_least("min_gap", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: min_gap=0 is not valid; expected an integer >= 1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} is not valid; expected an integer >= {low}")


def fraction(key: str, value: Any) -> None:
    """Refuse ``value`` for setting ``key`` unless it is a number (not a bool) in [0, 1), naming both."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r} is not valid; expected a number in [0, 1)")


def defaults_of(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a dataclass of options (what a group gets for the keys it leaves out)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def view(cls: type, values: Mapping[str, Any]) -> Any:
    """The typed, validated view of ``values`` (a parameter group) as the options dataclass ``cls``."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def given_option(source: type, name: str, *, prefix: str, group: str) -> Any:
    """A field of a configuration that hands ``source``'s option ``name`` on: None (``source``'s default then
    applies), the same help (after ``prefix``, with the default), the same bounds. What the command line, the
    Hugging Face ``optim_args`` and the planner accept is generated so from each component's options.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Knobs:
    ...     gap: int = option(10, help="steps between checks", minimum=1)
    >>> given_option(Knobs, "gap", prefix="auto: ", group="optimizer").metadata["help"]
    'auto: steps between checks (default 10)'
    """
    found = {f.name: f for f in dataclasses.fields(source)}[name]
    info = found.metadata
    help_text = f"{prefix}{resolve(info['help'])} (default {found.default})"
    return option(None, help=help_text, minimum=info["minimum"], above=info["above"], group=group)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested option dicts as ``{"optim.lr": ...}``: how resume compares configs and names fields.

    >>> flatten({"steps": 3, "optim": {"name": "adamw", "lr": 1e-3}})
    {'steps': 3, 'optim.name': 'adamw', 'optim.lr': 0.001}
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def count_or(word: str, name: str) -> Callable[[str], int | str]:
    """A parser of a setting written as text: an integer >= 1, or ``word`` (``update_proj_gap``'s and ``rank``'s
    ``"auto"``); its ValueError names the text and what is valid. ``name`` is the parser's (argparse's messages).

    >>> parse = count_or("auto", "parse_gap")
    >>> parse("200"), parse("auto"), parse.__name__
    (200, 'auto', 'parse_gap')
    >>> parse("0")
    Traceback (most recent call last):
    ...
    ValueError: '0' is not valid; expected an integer >= 1 or 'auto'
    """

    def parse(text: str) -> int | str:
        if text == word:
            return word
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{text!r} is not valid; expected an integer >= 1 or {word!r}")
        return count

    parse.__name__ = name
    return parse
