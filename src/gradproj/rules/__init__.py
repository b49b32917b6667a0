"""Update rules that see only the (projected) gradient: Adam, 8-bit Adam, Adafactor, RACS, COSMOS, Muon
(and its 8-bit buffer), SCALE's column-normalized SGD.

Example:
    >>> RULES
    ('adam', 'adam8bit', 'adafactor', 'racs', 'cosmos', 'muon', 'muon8bit', 'colnorm')
    >>> make_rule("racs").shardable
    True
"""

from typing import Any

from ..options import defaults_of, view
from .adafactor import Adafactor
from .adam import Adam
from .adam8bit import Adam8bit
from .base import UpdateRule
from .colnorm import ColumnNorm
from .cosmos import Cosmos
from .muon import Muon, Muon8bit
from .racs import RACS

#: every rule by name; a new rule is its module and one entry here (or :func:`register_rule`)
REGISTRY: dict[str, type[UpdateRule]] = {
    cls.name: cls for cls in (Adam, Adam8bit, Adafactor, RACS, Cosmos, Muon, Muon8bit, ColumnNorm)
}
RULES = tuple(REGISTRY)


def make_rule(name: str) -> UpdateRule:
    """Build a rule by name; the error lists the valid names."""
    if name not in REGISTRY:
        raise ValueError(f"rule={name!r} is not one of {tuple(REGISTRY)}")
    return REGISTRY[name]()


def register_rule(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Add a rule to :data:`REGISTRY` under its ``name`` (usable as a class decorator); the name must be new."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"rule name {cls.name!r} is empty or taken; registered: {tuple(REGISTRY)}")
    REGISTRY[cls.name] = cls
    return cls


def rule_defaults() -> dict[str, Any]:
    """The group keys the registered rules read beyond Adam's, with their defaults (each rule's ``options_type``);
    a key two rules declare must have one default.

    >>> rule_defaults()["momentum"], rule_defaults()["norm_dim"]
    (0.95, 1)
    """
    merged: dict[str, Any] = {}
    for cls in REGISTRY.values():
        for key, value in (defaults_of(cls.options_type) if cls.options_type is not None else {}).items():
            if merged.setdefault(key, value) != value:
                raise ValueError(f"rule {cls.name!r} declares {key}={value!r}; another rule declares {merged[key]!r}")
    return merged


def quantized_keys() -> dict[str, bool]:
    """Every state key a registered rule stores as 8-bit codes, and whether its map is signed.

    >>> quantized_keys()["momentum_buffer"], quantized_keys()["exp_avg_sq"]
    (True, False)
    """
    return {key: signed for cls in REGISTRY.values() for key, signed in cls.quantized.items()}


def check_rule_options(group: dict[str, Any]) -> None:
    """Every registered rule's own keys in ``group`` (which has them all, used or not), through their options."""
    for cls in REGISTRY.values():
        if cls.options_type is not None:
            view(cls.options_type, group)


__all__ = [
    "RACS", "REGISTRY", "RULES", "Adafactor", "Adam", "Adam8bit", "ColumnNorm", "Cosmos", "Muon", "Muon8bit",
    "UpdateRule", "check_rule_options", "make_rule", "quantized_keys", "register_rule", "rule_defaults",
]  # fmt: skip
