"""Text files as users bring them: UTF-8 (with or without a byte-order mark), UTF-8 with a few broken
bytes, or a legacy 8-bit encoding, each read without a refusal and with a note of what was done.

The rule, in order:

1. strict UTF-8 (a leading BOM dropped): nothing to note;
2. otherwise, if the text holds valid multi-byte UTF-8 (accented letters decoded as such), it is UTF-8
   with some broken bytes (a paragraph pasted from another file, a truncated character): each broken
   sequence becomes U+FFFD and is counted;
3. otherwise every non-ASCII byte is invalid UTF-8, which is what an 8-bit file looks like (Latin-1,
   Windows-1252: old Project Gutenberg books, exports from Windows tools): read as Windows-1252, whose
   five unassigned bytes become U+FFFD.

A file with NUL bytes in its first 64 KiB is refused as binary. Windows (CRLF) and old Mac (CR) line
ends become ``\\n``.

Example:
    >>> decode_text("café".encode("latin-1"), "menu.txt")
    DecodedText(text='café', note='menu.txt read as Windows-1252 (not UTF-8)')
    >>> decode_text(b"caf\\xc3\\xa9 \\xe9t\\xe9", "mixed.txt").note
    'mixed.txt: 2 byte sequences that are not UTF-8 replaced by U+FFFD'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: what undecodable bytes become
REPLACEMENT = "\ufffd"
#: how far into a file NUL bytes mark it as binary
BINARY_PROBE = 65536


@dataclass(frozen=True)
class DecodedText:
    """A file's text and, if it was not clean UTF-8, what was done to read it (else an empty note)."""

    text: str
    note: str = ""


def decode_text(data: bytes, name: str, *, flag: str = "--data") -> DecodedText:
    """``data`` (the bytes of the file called ``name``) as text by the module's rule; ``flag`` names the
    option the file came from in the refusal of a binary file."""
    if b"\x00" in data[:BINARY_PROBE]:
        raise ValueError(f"{flag} {name}: looks binary (NUL bytes); expected text (UTF-8 or another 8-bit encoding)")
    try:
        return DecodedText(_newlines(data.decode("utf-8-sig")))
    except UnicodeDecodeError:
        pass
    replaced = data.decode("utf-8-sig", errors="replace")
    broken = replaced.count(REPLACEMENT) - data.decode("utf-8-sig", errors="ignore").count(REPLACEMENT)
    if not replaced.replace(REPLACEMENT, "").isascii():  # valid multi-byte UTF-8 among the broken bytes
        what = "byte sequence that is" if broken == 1 else "byte sequences that are"
        note = f"{name}: {broken} {what} not UTF-8 replaced by U+FFFD"
        return DecodedText(_newlines(replaced), note)
    return DecodedText(_newlines(data.decode("cp1252", errors="replace")), f"{name} read as Windows-1252 (not UTF-8)")


def read_text(path: Path, *, flag: str = "--data") -> DecodedText:
    """The text of the file at ``path`` (:func:`decode_text`)."""
    return decode_text(path.read_bytes(), str(path), flag=flag)


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")
