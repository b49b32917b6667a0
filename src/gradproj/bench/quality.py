"""The side-by-side run: every method trained by the one training loop users run
(:class:`gradproj.train.loop.Trainer`, the ``gradproj pretrain`` task), with the same seed, initial
weights, batches, schedule, clipping and parameter split.

Each run is a run folder (config, metrics, dynamics, summary: what ``gradproj report`` draws) and one
JSON record: config, versions, device and seed; held-out loss and perplexity (and the curve);
optimizer-state bytes; peak memory; per-step times; time in basis refreshes.
:func:`gradproj.bench.tables.table` turns records into Markdown, :mod:`gradproj.bench.plots` into
figures.

Example:
    >>> cfg = bench_config(model="llama-1m", steps=300, rank=32, gap=50)
    >>> cfg.optim.name, cfg.optim.update_proj_gap, cfg.autocast, cfg.checkpoints, cfg.warmup_steps
    ('galore_adamw', 50, 'off', False, 30)
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..optim.build import OptimizerSpec
from ..optim.registry import Method, get_method
from ..train.config import PretrainConfig
from ..train.logs import environment, optimizer_state_bytes
from ..train.loop import Trainer
from ..train.pretrain import PretrainTask
from ..train.progress import Callback, NonFiniteError
from ..train.text import PretrainData, prepare_pretrain_data
from .timing import MemoryMeter, StepClock, refresh_target, timed_refreshes

#: Small LLaMA shapes that learn real text quickly (see ``gradproj.train.models.LLAMA_SHAPES``).
MODELS = ("llama-1m", "llama-5m", "llama-20m")
#: Steps left out of the median step time (allocator warm-up, the first refresh, compiles), at most half.
BURN_IN = 10


def bench_config(
    *,
    model: str = "llama-5m",
    steps: int = 300,
    batch_size: int = 32,
    seq_len: int = 128,
    rank: int = 64,
    gap: int | str = 50,
    seed: int = 0,
    device: str = "cpu",
    eval_every: int = 0,
    eval_windows: int = 128,
    dynamics_every: int = 0,
    clip: float = 1.0,
) -> PretrainConfig:
    """The ``gradproj pretrain`` config that every method of a comparison shares (each run sets its
    own method and rates): the paper's targets (attention and MLP), float32 (no autocast, on CUDA
    too), a log row every step, no checkpoints, ``eval_windows`` held-out windows per evaluation,
    the global gradient norm clipped to ``clip`` (0: not clipped)."""
    return PretrainConfig(
        model=model,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        optim=OptimizerSpec(rank=rank, update_proj_gap=gap),
        seed=seed,
        device=device,
        eval_every=eval_every,
        eval_tokens=eval_windows * seq_len,
        dynamics_every=dynamics_every,
        clip=clip,
        autocast="off",
        save_every=0,
        checkpoints=False,
        export=False,
        log_every=1,
        progress=False,
        tensorboard=False,
    )


def prepare_data(cfg: PretrainConfig) -> PretrainData:
    """The trainer's data for ``cfg`` (tokenized once, shared by every run of a comparison)."""
    return prepare_pretrain_data(cfg.data, cfg.tokenizer, cfg.vocab_size, cfg.seq_len)


def run_name(method: Method, lr_m: float, lr_o: float, seed: int) -> str:
    """The run folder's name inside the bench's ``--out``."""
    return f"{method.name}-lr{lr_m:g}-{lr_o:g}-seed{seed}"


def run(
    method: Method,
    lr_m: float,
    lr_o: float,
    data: PretrainData,
    base: PretrainConfig,
    out: Path,
    turn: tuple[Callback, Callback] | None = None,
) -> dict[str, Any]:
    """Train one method at one pair of learning rates through the Trainer; return its record.

    The run folder is ``out / run_name(...)`` (replaced if it exists). Step times are the trainer's
    optimizer steps (forward, backward, clipping, step), synchronised on CUDA; their median leaves
    out the first :data:`BURN_IN` steps. Evaluations are not timed. A run that the trainer stops for
    non-finite steps is recorded as diverged. ``turn``: callbacks before and after the step clock
    (``bench speed``'s round robin, whose records then also hold when each step began).
    """
    folder = out / run_name(method, lr_m, lr_o, base.seed)
    if (folder / "config.json").exists():
        shutil.rmtree(folder)
    config = replace(base, optim=replace(base.optim, name=method.name, lr=lr_m, other_lr=lr_o), out=str(folder))
    memory = MemoryMeter(config.device)
    clock = StepClock(config.device)
    callbacks = [clock] if turn is None else [turn[0], clock, turn[1]]
    trainer = Trainer(config, PretrainTask(config, data), callbacks=callbacks)
    with timed_refreshes(refresh_target(method), config.device) as refreshes:
        try:
            result = trainer.run()
            val_loss, history, summary = result.final_eval["loss"], result.progress.history, result.summary
        except NonFiniteError as error:
            print(f"{method.name} lr {lr_m:g}/{lr_o:g}: {error}", flush=True)
            val_loss, history, summary = math.inf, [], {}
    burn_in = min(BURN_IN, config.steps // 2)
    losses = clock.losses
    finite = [x for x in losses[-10:] if math.isfinite(x)]
    return {
        "method": method.name,
        "notes": method.summary,
        "lr_matrix": lr_m,
        "lr_other": lr_o,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf,
        "train_loss_last10": sum(finite) / len(finite) if finite else math.nan,
        "losses": [round(x, 5) for x in losses],
        "evals": [(h["step"], h["loss"]) for h in history],
        "state_bytes": optimizer_state_bytes(trainer.optimizer) if trainer.optimizer is not None else 0,
        "step_seconds_median": clock.median(burn_in),
        "step_seconds_mean": clock.mean(burn_in),
        "step_seconds_max": clock.max(burn_in),
        "burn_in": burn_in,
        "refresh_seconds": refreshes.seconds,
        "refreshes": refreshes.calls,
        "peak_memory_bytes": memory.peak(),
        "baseline_memory_bytes": memory.baseline,
        "memory_kind": memory.kind,
        "seconds": sum(clock.seconds),
        "diverged": not math.isfinite(val_loss),
        "skipped_steps": summary.get("skipped_steps", 0),
        "dynamics_samples": summary.get("dynamics", {}).get("samples", 0),
        **({"step_started": clock.started} if turn is not None else {}),
        "run_dir": str(folder),
        "config": asdict(config),
        "options": method.group_options,
        "versions": environment(config.device),
        "unigram_ppl": data.unigram_ppl,
    }


def _run_by_name(
    name: str, lr_m: float, lr_o: float, data: PretrainData, base: PretrainConfig, out: Path
) -> dict[str, Any]:
    record = run(get_method(name), lr_m, lr_o, data, base, out)
    return {**record, "memory_isolated": True}


def run_isolated(
    method: Method, lr_m: float, lr_o: float, data: PretrainData, base: PretrainConfig, out: Path
) -> dict[str, Any]:
    """:func:`run` in a fresh process, so that its peak RSS is this run's alone (CPU memory); the
    tokenized data is sent along (pickled), not prepared again."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run_by_name, method.name, lr_m, lr_o, data, base, out).result()
