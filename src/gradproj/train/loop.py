"""The training loop, shared by pre-training and fine-tuning: a task supplies the model, batches,
loss and evaluation; the loop owns the optimizer, schedule, clipping, non-finite steps, logs,
checkpoints, resume and signals. It reads top to bottom in :meth:`Trainer.run`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..dynamics import Dynamics
from ..layerwise import LayerwiseStepper, attach_layerwise
from ..optim.build import build_optimizer
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .logs import RunLogger, environment, optimizer_state_bytes
from .models import check_rank, default_rank
from .parallel import Parallel


class Task(Protocol):
    """What a kind of training supplies to the loop."""

    kind: str  # "pretrain" | "finetune": the run folder's prefix
    unit: str  # what a batch is counted in for throughput: "tokens" | "examples"

    def build_model(self) -> nn.Module: ...
    def batch(self, position: int, size: int) -> dict[str, torch.Tensor]: ...
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def count(self, batch: dict[str, torch.Tensor]) -> int: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def describe(self) -> dict[str, Any]: ...


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``code`` is the conventional exit status."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.code, self.checkpoint = 128 + signum, checkpoint


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup then cosine decay to ``floor`` (the GaLore paper's schedule), a pure function.

    >>> [round(lr_factor(s, 10, 2, 0.1), 3) for s in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Progress:
    """What a checkpoint stores about the loop (besides model, optimizer, scheduler and RNG)."""

    step: int = 0
    position: int = 0  # examples or windows consumed
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive: int = 0
    seen: int = 0  # tokens or examples trained on
    history: list[dict[str, float]] = field(default_factory=list)  # evaluations


@dataclass
class RunResult:
    run_dir: Path
    progress: Progress
    final_eval: dict[str, float]
    losses: list[float]
    summary: dict[str, Any]


class Trainer:
    """Train ``task`` under ``config``; ``resume`` is a run or checkpoint folder to continue."""

    def __init__(self, config: TrainConfig, task: Task, *, resume: str | Path | None = None) -> None:
        self.config, self.task = config, task
        self.checkpoint = resolve_checkpoint(Path(resume)) if resume is not None else None
        if self.checkpoint is not None:
            changed = config.changed_on_resume(read_meta(self.checkpoint).get("config", {}))
            if changed:
                raise CheckpointError(
                    f"--resume {resume}: the run's settings differ from the checkpoint's ({'; '.join(changed)}); "
                    "resume with the original settings (only steps, eval/save/log intervals and outputs may change)"
                )
        self.parallel = Parallel()
        self.run_dir = Path(self.parallel.same_on_every_rank(str(self._run_dir(resume))))
        self._signal: int | None = None
        self.rank: int | None = None  # the rank the optimizer uses, resolved in _setup (None: full rank)
        self.stepper: LayerwiseStepper | None = None  # set in _setup with --layerwise
        self.train_model: nn.Module | None = None  # the model, or its DDP wrapper under torchrun
        self._skipped_parameters = 0
        self.dynamics: Dynamics | None = None  # set in _setup unless --dynamics-every 0

    def _run_dir(self, resume: str | Path | None) -> Path:
        if self.config.out:
            return Path(self.config.out)
        if self.checkpoint is not None:
            return self.checkpoint.parent.parent
        return Path("runs") / f"{self.task.kind}-{self.config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with self.parallel.session():
            return self._run()

    def _run(self) -> RunResult:
        cfg, main = self.config, self.parallel.main
        started = time.perf_counter()
        model, optimizer, scheduler, progress = self._setup()
        logger = RunLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_step=progress.step or None, enabled=main)
        meter = _Throughput(self.task.unit)
        losses: list[float] = []
        bar = _progress_bar(cfg, progress.step, enabled=main)
        try:
            with self._signals():
                while progress.step < cfg.steps:
                    loss, grad_norm, units = self._step(model, optimizer, progress)
                    scheduler.step()
                    progress.step += 1
                    losses.append(loss)
                    meter.add(units)
                    lr = optimizer.param_groups[0]["lr"]
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **meter.postfix, refresh=False)
                    if progress.step % cfg.log_every == 0 or progress.step == cfg.steps:
                        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": progress.skipped}
                        logger.write("train", progress.step, {**row, **meter.rate(), **self.parallel.comm_bytes()})
                        logger.write_dynamics(self.dynamics.drain() if self.dynamics else [])
                    signum = self.parallel.largest(self._signal or 0)  # every rank stops after the same step
                    if signum:
                        raise Interrupted(signum, self._save(model, optimizer, scheduler, progress, logger))
                    if progress.step < cfg.steps:
                        paused = time.perf_counter()
                        if cfg.eval_every and progress.step % cfg.eval_every == 0:
                            self._evaluate(model, progress, logger)
                        if cfg.save_every and progress.step % cfg.save_every == 0:
                            self._save(model, optimizer, scheduler, progress, logger)
                        meter.exclude(time.perf_counter() - paused)
            final = self._evaluate(model, progress, logger)
            self._save(model, optimizer, scheduler, progress, logger)
        finally:
            bar.close()
            logger.write_dynamics(self.dynamics.drain() if self.dynamics else [])
            logger.close()
        summary = self._summary(model, progress, final, losses, optimizer)
        summary["seconds"] = time.perf_counter() - started
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return RunResult(self.run_dir, progress, final, losses, summary)

    def _setup(self) -> tuple[nn.Module, torch.optim.Optimizer, Any, Progress]:
        """Model, optimizer and schedule from the config; their state from the checkpoint if resuming."""
        cfg, task = self.config, self.task
        torch.manual_seed(cfg.seed)
        model = task.build_model().to(self.parallel.device(cfg.device))
        spec = cfg.optimizer_spec(cfg.rank if cfg.rank is not None else default_rank(model))
        if spec.projected and spec.method.fixed_rank is None:
            check_rank(model, cfg.target_modules, spec.rank)
        self.rank = spec.resolved_rank
        if self.checkpoint is not None and not spec.method.resumable:
            raise CheckpointError(
                f"--resume with --optimizer {spec.name} ({spec.method.summary}): its state does not load with "
                "torch.load(weights_only=True), so it cannot be resumed; use one of gradproj's optimizers"
            )
        optimizer = build_optimizer(model, spec, layerwise=cfg.layerwise)
        self.train_model, self.stepper = self.parallel.wrap(
            model, optimizer, low_rank=cfg.low_rank_comm, layerwise=cfg.layerwise, clip=cfg.clip
        )
        if cfg.layerwise and self.parallel.world == 1:
            clip = cfg.clip if cfg.clip > 0 else None
            self.stepper = attach_layerwise(optimizer, grad_accum=cfg.grad_accum, max_grad_norm=clip)  # type: ignore[arg-type]
        if cfg.dynamics_every and self.parallel.main:  # every rank sees the same gradients; rank 0 writes
            self.dynamics = Dynamics(optimizer, every=cfg.dynamics_every, energy=not cfg.low_rank_comm)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        )
        progress = Progress()
        if self.checkpoint is not None:
            saved = load_checkpoint(self.checkpoint, model, optimizer, scheduler)
            dynamics = saved.pop("dynamics", None)  # spike statistics and totals, as of the checkpoint
            if self.dynamics is not None and dynamics is not None:
                self.dynamics.load_state_dict(dynamics)
            progress = Progress(**saved)
        self._write_run_files()
        return model, optimizer, scheduler, progress

    def _step(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> tuple[float, float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; a non-finite loss or gradient
        norm skips it (weights and optimizer state untouched). Returns loss, grad norm, units."""
        cfg, task = self.config, self.task
        total_loss, units, finite = 0.0, 0, True
        parallel, device = self.parallel, self.parallel.device(cfg.device)
        if self.dynamics is not None:  # rows carry the trainer's step number (layer-wise steps run in backward)
            self.dynamics.step = progress.step + 1
        for micro in range(cfg.grad_accum):
            start = parallel.shard(progress.position, cfg.batch_size)
            batch = {k: v.to(device) for k, v in task.batch(start, cfg.batch_size).items()}
            progress.position += cfg.batch_size * parallel.world
            units += task.count(batch) * parallel.world
            with self._autocast(), parallel.sync(last=micro == cfg.grad_accum - 1):
                loss = task.loss(self.train_model or model, batch) / cfg.grad_accum
                if not torch.isfinite(loss):
                    finite = False
                    if parallel.world == 1:
                        continue
                # with --layerwise, the last micro-batch's backward steps every parameter; under DDP every
                # rank runs backward (collectives must line up): a NaN reaches the averaged gradient instead
                loss.backward()
            total_loss += float(loss.detach())
        total_loss = parallel.mean(total_loss)
        finite = parallel.every(finite)
        if self.stepper is not None:
            finite, norm = self._layerwise_outcome(finite)
        else:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf))
        if self.dynamics is not None:
            self.dynamics.observe_grad_norm(progress.step + 1, norm)
        if finite and math.isfinite(norm):
            optimizer.step()  # a no-op with --layerwise
            progress.consecutive = 0
            progress.seen += units
        else:
            progress.skipped += 1
            progress.consecutive += 1
            print(f"gradproj: step {progress.step + 1} skipped: non-finite loss or gradient norm ({norm})", flush=True)
            if progress.consecutive >= cfg.max_nonfinite:
                last = latest_checkpoint(self.run_dir)
                raise NonFiniteError(
                    f"{progress.consecutive} consecutive non-finite steps (up to step {progress.step + 1}); "
                    f"stopped without saving. Last good checkpoint: {last or 'none'}; lower --lr or check the data"
                )
            total_loss = math.nan
        optimizer.zero_grad(set_to_none=True)
        return total_loss, norm, units

    def _layerwise_outcome(self, finite_loss: bool) -> tuple[bool, float]:
        """Whether a layer-wise step went through, and its gradient norm. A non-finite loss
        stopped before backward: the partial accumulation is dropped and nothing was stepped.
        A non-finite gradient skipped only its parameter (others were already stepped)."""
        stepper = self.stepper
        assert stepper is not None
        if not finite_loss:
            stepper.discard()
            return False, math.nan
        skipped = stepper.skipped_parameters - self._skipped_parameters
        self._skipped_parameters = stepper.skipped_parameters
        if skipped:
            print(f"gradproj: {skipped} parameter(s) with a non-finite gradient were not stepped", flush=True)
        return not skipped, stepper.grad_norm

    # -- pieces ---------------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, progress: Progress, logger: RunLogger) -> dict[str, float]:
        model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(model)
        model.train()
        logger.write("eval", progress.step, metrics)
        progress.history.append({"step": progress.step, **metrics})
        return metrics

    def _save(self, model: nn.Module, optimizer: Any, scheduler: Any, progress: Progress, logger: RunLogger) -> Path:
        """Rank 0 writes (every rank holds the same weights and state); the others wait for it. The
        dynamics rows so far are logged first, so the saved spike statistics are those of the logged rows."""
        path = self.run_dir / "checkpoints" / f"step-{progress.step:08d}"
        if self.parallel.main:
            state: dict[str, Any] = {k: v for k, v in progress.__dict__.items()}
            if self.dynamics is not None:
                logger.write_dynamics(self.dynamics.drain())
                state["dynamics"] = self.dynamics.state_dict()
            meta = {"config": self.config.to_dict(), "task": self.task.describe(), "world_size": self.parallel.world}
            path = save_checkpoint(
                self.run_dir, progress.step, model, optimizer, scheduler, state, keep=self.config.keep, meta=meta
            )
        self.parallel.barrier()
        return path

    def _write_run_files(self) -> None:
        if not self.parallel.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "resolved_rank": self.rank, "task": self.task.describe()}
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (self.run_dir / "environment.json").write_text(json.dumps(environment(self.config.device), indent=2))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        device = torch.device(self.config.device).type
        wanted = self.config.autocast == "bf16" or (self.config.autocast == "auto" and device == "cuda")
        return torch.autocast(device, dtype=torch.bfloat16) if wanted else contextlib.nullcontext()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag; the loop saves after the current step and stops."""

        def handler(signum: int, _frame: Any) -> None:
            if self._signal is not None:  # asked twice: stop now (the last checkpoint is whole: saves are atomic)
                raise KeyboardInterrupt
            self._signal = signum
            print(f"\ngradproj: {signal.Signals(signum).name}: saving after this step (again to stop now)", flush=True)

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _summary(
        self,
        model: nn.Module,
        progress: Progress,
        final: dict[str, float],
        losses: list[float],
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        finite = [x for x in losses[-10:] if math.isfinite(x)]
        return {
            "run_dir": str(self.run_dir),
            "model_name": str(getattr(self.config, "model", None) or self.task.describe().get("model", "")),
            "parameters": sum(p.numel() for p in model.parameters()),
            "rank": self.rank,  # the rank the optimizer uses; None for the full-rank baselines
            "steps": progress.step,
            f"{self.task.unit}_seen": progress.seen,
            "skipped_steps": progress.skipped,
            "final_train_loss": sum(finite) / len(finite) if finite else math.nan,
            "eval": final,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "layerwise": self.stepper is not None,
            # layer-wise: the most gradient bytes alive at once; standard: every gradient, held until the step
            "gradient_bytes": self.stepper.peak_gradient_bytes
            if self.stepper is not None
            else sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
            **self.task.describe(),
            **({"dynamics": self.dynamics.summary()} if self.dynamics is not None else {}),
        }


class _Throughput:
    """Units (tokens or examples) per second of training, evaluation and checkpoint time excluded."""

    def __init__(self, unit: str) -> None:
        self.unit, self.units, self.start, self.last = unit, 0, time.perf_counter(), 0.0

    def add(self, units: int) -> None:
        self.units += units
        self.last = self.units / max(time.perf_counter() - self.start, 1e-9)

    def rate(self) -> dict[str, float]:
        """The rate since the previous call (the log row's value), then a new window."""
        rate = {f"{self.unit}_per_s": self.last}
        self.units, self.start = 0, time.perf_counter()
        return rate

    def exclude(self, seconds: float) -> None:
        """Leave out time spent evaluating or saving (it is not training time)."""
        self.start += seconds

    @property
    def postfix(self) -> dict[str, str]:
        return {f"{self.unit[:3]}/s": f"{self.last:.0f}"}


def _progress_bar(cfg: TrainConfig, start: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    disable = not (cfg.progress and enabled)
    return tqdm(total=cfg.steps, initial=start, disable=disable, unit="step", dynamic_ncols=True)
