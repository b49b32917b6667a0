"""Update rules that see only the (projected) gradient: Adam, 8-bit Adam, Adafactor, RACS, COSMOS."""

from .adafactor import Adafactor
from .adam import Adam
from .adam8bit import Adam8bit
from .base import UpdateRule
from .cosmos import Cosmos
from .racs import RACS

RULES = ("adam", "adam8bit", "adafactor", "racs", "cosmos")


def make_rule(name: str) -> UpdateRule:
    """Build a rule by name; the error lists the valid names."""
    if name == "adam":
        return Adam()
    if name == "adam8bit":
        return Adam8bit()
    if name == "adafactor":
        return Adafactor()
    if name == "racs":
        return RACS()
    if name == "cosmos":
        return Cosmos()
    raise ValueError(f"rule={name!r} is not one of {RULES}")


__all__ = ["RACS", "RULES", "Adafactor", "Adam", "Adam8bit", "Cosmos", "UpdateRule", "make_rule"]
