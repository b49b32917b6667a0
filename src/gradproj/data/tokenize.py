"""A byte-level BPE tokenizer trained on the training split with Hugging Face ``tokenizers``,
cached by vocabulary size and a hash of the text.

Example:
    >>> tok = train_tokenizer("to be or not to be " * 50, vocab_size=300)
    >>> tok.decode(tok.encode("to be").ids)
    'to be'
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .fetch import cache_dir


def train_tokenizer(text: str, vocab_size: int = 4096, cache: Path | None = None) -> Any:
    """Train (or load from cache) a byte-level BPE tokenizer on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / f"bpe-{vocab_size}-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")  # several processes (torchrun ranks) may train at once
    tokenizer.save(str(tmp))
    tmp.replace(path)
    return tokenizer


def encode_corpus(tokenizer: Any, text: str, cache: Path | None = None) -> torch.Tensor:
    """Token ids of ``text`` as one int64 tensor (documents joined as they are), cached by a hash of
    the tokenizer and the text: every run on the same data reads them back instead of encoding again."""
    key = hashlib.sha256(tokenizer.to_str().encode() + b"\0" + text.encode()).hexdigest()[:24]
    path = (cache or cache_dir()) / "tokens" / f"{key}.pt"
    if path.exists():
        try:
            ids: torch.Tensor = torch.load(path, weights_only=True)
            return ids
        except Exception:  # a damaged cache file is rebuilt
            path.unlink(missing_ok=True)
    chunks = [chunk + "\n\n" for chunk in text.split("\n\n")]
    ids = torch.tensor([i for encoding in tokenizer.encode_batch(chunks) for i in encoding.ids], dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")  # several processes (torchrun ranks) may encode at once
    torch.save(ids, tmp)
    tmp.replace(path)
    return ids
