"""Real text that works offline: the embedded Shakespeare corpus and its tokenizer."""

from .shakespeare import Corpus, load_corpus
from .tokenize import encode_corpus, train_tokenizer

__all__ = ["Corpus", "encode_corpus", "load_corpus", "train_tokenizer"]
