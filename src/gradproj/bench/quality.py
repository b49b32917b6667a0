"""Quality on real text: a small LLaMA trained on the embedded Shakespeare corpus by every
method with the same seed, batches, schedule and clipping, and a per-group learning-rate sweep.

Each run writes one JSON record (config, versions, device, seed, final validation loss and
perplexity, optimizer-state bytes, time); :func:`table` turns records into Markdown.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import encode_corpus, load_corpus, train_tokenizer
from .methods import Method

#: Small LLaMA shapes that learn real text quickly.
MODELS: dict[str, dict[str, Any]] = {
    "llama-1m": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4},
    "llama-5m": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
}


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
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0  # add-one smoothing
    log_p = (counts / counts.sum()).log()
    return Data(train, validation, math.exp(-float(log_p[validation].mean())))


def build_model(cfg: RunConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.seq_len, **MODELS[cfg.model])
    model: torch.nn.Module = LlamaForCausalLM(config)
    return model.to(cfg.device)


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
    windows = validation[: count * width].view(count, width).to(cfg.device)
    total, tokens = 0.0, 0
    for chunk in windows.split(32):
        logits = model(chunk[:, :-1]).logits.float()  # batch x seq x vocab
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total, tokens = total + float(loss), tokens + chunk[:, 1:].numel()
    model.train()
    return total / tokens


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup then cosine decay to 10% (the GaLore paper's schedule)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in the optimizer's state (what a checkpoint would store)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in _tensors(state))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for v in getattr(value, "__dict__", {}).values() for t in _tensors(v)]  # peers' projector objects


def run(method: Method, lr_m: float, lr_o: float, data: Data, cfg: RunConfig) -> dict[str, Any]:
    """Train one method at one pair of learning rates; return its record."""
    model = build_model(cfg)
    mats, rest = split_parameters(model)
    optimizer = method.build(mats, rest, lr_m, lr_o, int(method.options.get("rank", cfg.rank)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    windows = batches(data.train, cfg)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = windows[step].to(cfg.device)
        loss = _loss(model, batch)
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
        "state_bytes": state_bytes(optimizer),
        "seconds": elapsed,
        "diverged": not math.isfinite(val_loss),
        "config": asdict(cfg),
        "options": method.options,
        "versions": versions(),
        "unigram_ppl": data.unigram_ppl,
    }


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits  # batch x seq x vocab
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def versions() -> dict[str, str]:
    """Versions and device, recorded with every result."""
    import gradproj

    out = {"python": platform.python_version(), "torch": torch.__version__, "gradproj": gradproj.__version__}
    out["device"] = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    )
    for name in ("transformers", "galore_torch", "fira", "apollo_torch", "bitsandbytes"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "installed"))
        except Exception:
            out[name] = "missing"
    return out


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
