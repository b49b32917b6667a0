"""Update rules that see only the (projected) gradient: Adam, 8-bit Adam, Adafactor, RACS, COSMOS.

Example:
    >>> RULES
    ('adam', 'adam8bit', 'adafactor', 'racs', 'cosmos')
    >>> make_rule("racs").shardable
    True
"""

from .adafactor import Adafactor
from .adam import Adam
from .adam8bit import Adam8bit
from .base import UpdateRule
from .cosmos import Cosmos
from .racs import RACS

#: every rule by name; a new rule is its module and one entry here (or :func:`register_rule`)
REGISTRY: dict[str, type[UpdateRule]] = {cls.name: cls for cls in (Adam, Adam8bit, Adafactor, RACS, Cosmos)}
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


__all__ = [
    "RACS", "REGISTRY", "RULES", "Adafactor", "Adam", "Adam8bit", "Cosmos", "UpdateRule", "make_rule", "register_rule",
]  # fmt: skip
