"""The side-by-side run: a small LLaMA trained on the embedded Shakespeare corpus by every method
with the same seed, initial weights, batches, schedule and clipping.

Each run returns one JSON record: config, versions, device and seed; held-out loss and perplexity
(and the curve); optimizer-state bytes; peak memory; per-step times; time in basis refreshes.
:func:`gradproj.bench.tables.table` turns records into Markdown, :mod:`gradproj.bench.plots` into
figures.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data import encode_corpus, load_corpus, train_tokenizer
from ..dynamics import Dynamics
from ..optim.build import build_optimizer
from ..train.logs import environment, optimizer_state_bytes
from ..train.loop import lr_factor
from ..train.models import build_causal_lm
from ..train.pretrain import heldout_loss, next_token_loss
from ..train.text import unigram_perplexity
from .methods import Method, bench_spec, get_method
from .timing import MemoryMeter, StepClock, timed_refreshes

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
    eval_every: int = 0  # steps between evaluations for the curve (0: only at the end); not timed
    burn_in: int = 10  # steps left out of the median step time
    dynamics_every: int = 0  # sample training dynamics (gradproj.dynamics) every N steps; 0: off
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
    """Train one method at one pair of learning rates; return its record.

    Step times are per optimizer step (forward, backward, clipping, step), synchronised on CUDA;
    their median leaves out the first ``burn_in`` steps. Evaluations are not timed.
    """
    memory = MemoryMeter(cfg.device)
    model = build_model(cfg)
    optimizer = build_optimizer(model, bench_spec(method, lr_m, lr_o, rank=cfg.rank, gap=cfg.gap))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup, 0.1))
    windows = batches(data.train, cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    clock = StepClock(cfg.device)
    dynamics = Dynamics(optimizer, every=cfg.dynamics_every) if cfg.dynamics_every else None
    with timed_refreshes(method.refresh, cfg.device) as refreshes:
        for step in range(cfg.steps):
            with clock.step():
                loss = next_token_loss(model, windows[step].to(cfg.device))
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(trained, cfg.clip)
                if dynamics is not None:
                    dynamics.observe_grad_norm(step + 1, norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                evals.append((step + 1, evaluate(model, data.validation, cfg)))
    val_loss = evaluate(model, data.validation, cfg)
    burn_in = min(cfg.burn_in, cfg.steps // 2)
    return {
        "method": method.name,
        "notes": method.summary,
        "lr_matrix": lr_m,
        "lr_other": lr_o,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "losses": [round(x, 5) for x in losses],
        "evals": [*evals, (cfg.steps, val_loss)],
        "state_bytes": optimizer_state_bytes(optimizer),
        "step_seconds_median": clock.median(burn_in),
        "step_seconds_mean": clock.mean(burn_in),
        "burn_in": burn_in,
        "refresh_seconds": refreshes.seconds,
        "refreshes": refreshes.calls,
        "peak_memory_bytes": memory.peak(),
        "baseline_memory_bytes": memory.baseline,
        "memory_kind": memory.kind,
        "seconds": sum(clock.seconds),
        "diverged": not math.isfinite(val_loss),
        "dynamics_rows": len(dynamics.rows) if dynamics is not None else 0,
        "config": asdict(cfg),
        "options": method.group_options,
        "versions": environment(cfg.device),
        "unigram_ppl": data.unigram_ppl,
    }


def _run_by_name(name: str, lr_m: float, lr_o: float, data: Data, cfg: RunConfig) -> dict[str, Any]:
    record = run(get_method(name), lr_m, lr_o, data, cfg)
    return {**record, "memory_isolated": True}


def run_isolated(method: Method, lr_m: float, lr_o: float, data: Data, cfg: RunConfig) -> dict[str, Any]:
    """:func:`run` in a fresh process, so that its peak RSS is this run's alone (CPU memory)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run_by_name, method.name, lr_m, lr_o, data, cfg).result()
