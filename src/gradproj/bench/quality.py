"""Quality on real text: a small LLaMA trained on the embedded Shakespeare corpus by every
method with the same seed, batches, schedule and clipping, and a per-group learning-rate sweep.

Each run writes one JSON record (config, versions, device, seed, final validation loss and
perplexity, optimizer-state bytes, time); :func:`table` turns records into Markdown.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import encode_corpus, load_corpus, train_tokenizer
from ..train.logs import environment, optimizer_state_bytes
from ..train.loop import lr_factor
from ..train.models import build_causal_lm
from ..train.pretrain import heldout_loss, next_token_loss
from ..train.text import unigram_perplexity
from .methods import Method

#: Small LLaMA shapes that learn real text quickly (see ``gradproj.train.models.LLAMA_SHAPES``).
MODELS = ("llama-1m", "llama-5m", "llama-20m")


@dataclass(frozen=True)
class RunConfig:
    """One training run; every method in a comparison shares all fields but the method's."""

    model: str = "llama-5m"
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 300
    warmup: int = 30
    clip: float = 1.0
    rank: int = 64
    gap: int = 50
    seed: int = 0
    eval_windows: int = 128
    device: str = "cpu"


@dataclass(frozen=True)
class Data:
    train: torch.Tensor
    validation: torch.Tensor
    unigram_ppl: float


def prepare_data(vocab_size: int) -> Data:
    """Tokenized train/validation splits and the unigram perplexity of the validation split."""
    corpus = load_corpus()
    tokenizer = train_tokenizer(corpus.train, vocab_size)
    train, validation = encode_corpus(tokenizer, corpus.train), encode_corpus(tokenizer, corpus.validation)
    return Data(train, validation, unigram_perplexity(train, validation, vocab_size))


def build_model(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return build_causal_lm(cfg.model, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len).to(cfg.device)


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Attention and MLP matrices (the paper's targets) vs. embeddings, norms and head."""
    mats: list[torch.Tensor] = [
        p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)
    ]
    ids = {id(p) for p in mats}
    return mats, [p for p in model.parameters() if id(p) not in ids]


def batches(train: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """``steps x batch x (seq_len + 1)`` windows, identical for every method (seeded)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    starts = torch.randint(0, train.numel() - cfg.seq_len - 1, (cfg.steps, cfg.batch_size), generator=gen)
    return train[starts.unsqueeze(-1) + torch.arange(cfg.seq_len + 1)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, validation: torch.Tensor, cfg: RunConfig) -> float:
    """Token-weighted mean next-token cross-entropy over fixed, non-overlapping windows."""
    model.eval()
    width = cfg.seq_len + 1
    count = min(cfg.eval_windows, validation.numel() // width)
    loss, _ = heldout_loss(model, validation[: count * width].view(count, width))
    model.train()
    return loss


def run(method: Method, lr_m: float, lr_o: float, data: Data, cfg: RunConfig) -> dict[str, Any]:
    """Train one method at one pair of learning rates; return its record."""
    model = build_model(cfg)
    mats, rest = split_parameters(model)
    optimizer = method.build(mats, rest, lr_m, lr_o, int(method.options.get("rank", cfg.rank)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup, 0.1))
    windows = batches(data.train, cfg)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = windows[step].to(cfg.device)
        loss = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    elapsed = time.perf_counter() - start
    val_loss = evaluate(model, data.validation, cfg)
    return {
        "method": method.name,
        "lr_matrix": lr_m,
        "lr_other": lr_o,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "train_loss_last10": sum(losses[-10:]) / 10,
        "state_bytes": optimizer_state_bytes(optimizer),
        "seconds": elapsed,
        "diverged": not math.isfinite(val_loss),
        "config": asdict(cfg),
        "options": method.options,
        "versions": environment(cfg.device),
        "unigram_ppl": data.unigram_ppl,
    }


def best_per_method(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The record with the lowest validation loss for each method, in first-seen order."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        current = best.get(record["method"])
        if current is None or (
            not record["diverged"] and (current["diverged"] or record["val_loss"] < current["val_loss"])
        ):
            best[record["method"]] = record
    return list(best.values())


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: best validation perplexity per method, its learning rates, state bytes and time."""
    rows = best_per_method(records)
    adamw = next((r for r in rows if r["method"] == "adamw"), rows[0])
    lines = [
        "| method | val ppl | vs AdamW | lr (matrices / rest) | state MiB | vs AdamW | s/run |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        lines.append(
            f"| {r['method']} | {r['val_ppl']:.2f} | {r['val_ppl'] / adamw['val_ppl']:.3f} | "
            f"{r['lr_matrix']:g} / {r['lr_other']:g} | {r['state_bytes'] / 2**20:.2f} | "
            f"{r['state_bytes'] / adamw['state_bytes']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def write_records(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
