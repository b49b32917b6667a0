"""Update rules that see only the (projected) gradient: Adam, 8-bit Adam, Adafactor."""

from .adafactor import Adafactor
from .adam import Adam
from .adam8bit import Adam8bit
from .base import UpdateRule

RULES = ("adam", "adam8bit", "adafactor")


def make_rule(name: str) -> UpdateRule:
    """Build a rule by name; the error lists the valid names."""
    if name == "adam":
        return Adam()
    if name == "adam8bit":
        return Adam8bit()
    if name == "adafactor":
        return Adafactor()
    raise ValueError(f"rule={name!r} is not one of {RULES}")


__all__ = ["RULES", "Adafactor", "Adam", "Adam8bit", "UpdateRule", "make_rule"]
