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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dynamics import Dynamics
from ..layerwise import LayerwiseStepper, attach_layerwise
from ..memory import Setup
from ..optim.build import build_optimizer, reference_rank
from ..optim.placement import is_sharded
from ..optim.precision import WEIGHT_DTYPES
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    resume_config,
    save_checkpoint,
)
from .config import TrainConfig, upgrade
from .logs import RunLogger, environment, gradient_policy
from .memory_check import StepMemoryMeter, planned, preflight
from .models import check_rank, default_rank, enable_activation_checkpointing
from .parallel import Parallel
from .progress import (
    Callback,
    Interrupted,
    Progress,
    RunResult,
    SkipPolicy,
    Throughput,
    eval_line,
    lr_factor,
    progress_bar,
    schedule_note,
)
from .sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .summary import run_summary
from .task import Task

__all__ = ["Task", "Trainer"]


def _sum(counts: dict[str, int | None]) -> int:
    return sum(v for k, v in counts.items() if v is not None and k != "peak")


class Trainer:
    """Train ``task`` under ``config``; ``resume`` is a run or checkpoint folder to continue;
    ``callbacks`` see every step (:class:`~gradproj.train.progress.Callback`)."""

    def __init__(
        self,
        config: TrainConfig,
        task: Task,
        *,
        resume: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if resume is not None:  # the saved settings, checked against this config (the CLI's path too)
            config = resume_config(type(config), Path(resume), config.to_dict())
        self.checkpoint = resolve_checkpoint(Path(resume)) if resume is not None else None
        self.parallel = Parallel(fsdp=config.fsdp, replicate=config.fsdp_replicate)
        config = self.parallel.batches(config)  # the global batch recorded; this world size's micro-batches
        self.config, self.task, self.callbacks = config, task, tuple(callbacks)
        self.run_dir = Path(self.parallel.same_on_every_rank(str(self._run_dir(resume))))
        self.skips = SkipPolicy(config.max_nonfinite, self.run_dir, report=self.parallel.main)
        self._signal: int | None = None
        self.reference_rank: int | None = None  # rank auto: the fixed rank its state is compared with
        self.rank: int | str | None = None  # the rank the optimizer uses, resolved in _setup (None: full rank; auto)
        self.stepper: LayerwiseStepper | None = None  # set in _setup with --layerwise
        self.train_model: nn.Module | None = None  # the model, or its DDP wrapper under torchrun
        self.dynamics: Dynamics | None = None  # set in _setup unless --dynamics-every 0
        self.optimizer: torch.optim.Optimizer | None = None  # set in _setup
        self.memory: StepMemoryMeter | None = None  # measures one step against the plan (set in _setup)
        self.planned: dict[str, int | None] = {}

    def _run_dir(self, resume: str | Path | None) -> Path:
        if self.config.out:
            return Path(self.config.out)
        if self.checkpoint is not None:
            return self.checkpoint.parent.parent
        return Path("runs") / f"{self.task.kind}-{self.config.optim.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with self.parallel.session():
            return self._run()

    def _run(self) -> RunResult:
        cfg, main = self.config, self.parallel.main
        started = time.perf_counter()
        model, optimizer, scheduler, progress = self._setup()
        logger = RunLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_step=progress.step or None, enabled=main)
        meter = Throughput(self.task.unit)
        losses: list[float] = []
        bar = progress_bar(cfg.steps, progress.step, enabled=cfg.progress and main)
        try:
            with self._signals():
                while progress.step < cfg.steps:
                    for callback in self.callbacks:
                        callback.on_step_begin(progress.step + 1)
                    loss, grad_norm, units = self._train_step(model, optimizer, progress)
                    scheduler.step()
                    progress.step += 1
                    for callback in self.callbacks:
                        callback.on_step_end(progress.step, loss)
                    losses.append(loss)
                    meter.add(units)
                    lr = float(optimizer.param_groups[0]["lr"])  # torchao keeps it as a tensor
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **meter.postfix, refresh=False)
                    if progress.step % cfg.log_every == 0 or progress.step == cfg.steps:
                        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": progress.skipped}
                        policy = gradient_policy(optimizer)  # running totals: the report plots their steps
                        if policy is not None:
                            row.update(spam_clipped=policy["clipped"], spam_resets=policy["resets"])
                        logger.write("train", progress.step, {**row, **meter.rate(), **self.parallel.comm_bytes()})
                        logger.write_dynamics(self.dynamics.drain() if self.dynamics else [])
                    signum = self.parallel.largest(self._signal or 0)  # every rank stops after the same step
                    if signum:
                        raise Interrupted(signum, self._save(model, optimizer, scheduler, progress, logger))
                    if progress.step < cfg.steps:
                        paused = time.perf_counter()
                        if cfg.eval_every and progress.step % cfg.eval_every == 0:
                            bar.set_description_str("held-out evaluation")  # the bar would seem stalled
                            metrics = self._evaluate(model, progress, logger)
                            bar.set_description_str("", refresh=False)
                            if not bar.disable:
                                bar.write(eval_line(progress.step, metrics))
                        if cfg.checkpoints and cfg.save_every and progress.step % cfg.save_every == 0:
                            self._save(model, optimizer, scheduler, progress, logger)
                        meter.exclude(time.perf_counter() - paused)
            final = self._evaluate(model, progress, logger)
            last = self._save(model, optimizer, scheduler, progress, logger) if cfg.checkpoints else None
        finally:
            bar.close()
            logger.write_dynamics(self.dynamics.drain() if self.dynamics else [])
            logger.close()
        summary = run_summary(self, model, progress, final, losses, optimizer)
        summary["model_dir"] = self._export(model, last)
        summary["seconds"] = time.perf_counter() - started
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return RunResult(self.run_dir, progress, final, losses, summary, model)

    def _setup(self) -> tuple[nn.Module, torch.optim.Optimizer, Any, Progress]:
        """Model, optimizer and schedule from the config; their state from the checkpoint if resuming."""
        cfg, task = self.config, self.task
        torch.manual_seed(cfg.seed)
        device = torch.device(self.parallel.device(cfg.device))
        model = task.build_model().to(dtype=WEIGHT_DTYPES[cfg.dtype])
        model.train()  # from_pretrained returns eval mode: no dropout, and transformers checkpoints only in training
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        spec = cfg.optimizer_spec(default_rank(model))
        if spec.projected and spec.method.fixed_rank is None and isinstance(spec.resolved_rank, int):
            check_rank(model, spec.target_modules, spec.resolved_rank)  # rank auto: each matrix capped by its shape
        self.rank = spec.resolved_rank
        self.reference_rank = reference_rank(spec, default_rank(model))
        if self.checkpoint is not None and not spec.method.resumable:
            raise CheckpointError(
                f"--resume with --optimizer {spec.name} ({spec.method.summary}): its state does not load with "
                "torch.load(weights_only=True), so it cannot be resumed; use one of gradproj's optimizers"
            )
        setup = Setup.from_config(
            cfg, vocab_size=getattr(model.config, "vocab_size", None), world_size=self.parallel.world
        )
        self.planned = planned(setup, model)
        if device.type == "cuda" and cfg.preflight:  # before anything is on the device
            preflight(setup, self.planned["peak"] or _sum(self.planned), torch.cuda.mem_get_info(device)[0])
        model = self.parallel.prepare(model.to(device), device)  # FSDP2: this rank's rows from here on
        rounding = cfg.weight_update if cfg.dtype == "bf16" else "nearest"
        # nonfinite="checked": _gradient_norm skips a step whose norm is not finite, so step() need not read
        # every gradient again to check it
        optimizer = self.optimizer = build_optimizer(
            model, spec, layerwise=cfg.layerwise, bf16_update=rounding, nonfinite="checked"
        )
        self.train_model, self.stepper = self.parallel.wrap(
            model, optimizer, low_rank=cfg.low_rank_comm, layerwise=cfg.layerwise, clip=cfg.clip
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        )
        progress, dynamics = Progress(), None
        if self.checkpoint is not None:  # before layer-wise hooks and dynamics see a step (a sharded load takes one)
            load = load_sharded_checkpoint if cfg.fsdp else load_checkpoint
            saved = load(self.checkpoint, model, optimizer, scheduler)
            dynamics = saved.pop("dynamics", None)  # spike statistics and totals, as of the checkpoint
            progress = Progress(**saved)
            self._note_schedule(progress.step)
        if cfg.layerwise and self.parallel.world == 1:
            clip = cfg.clip if cfg.clip > 0 else None
            self.stepper = attach_layerwise(optimizer, grad_accum=cfg.grad_accum, max_grad_norm=clip)  # type: ignore[arg-type]
        if cfg.dynamics_every and cfg.fsdp and self.parallel.main:
            print("gradproj: --fsdp: no training dynamics (the probes read whole gradients and bases)", flush=True)
        elif cfg.dynamics_every and self.parallel.main:  # every rank sees the same gradients; rank 0 writes
            self.dynamics = Dynamics(optimizer, every=cfg.dynamics_every, energy=not cfg.low_rank_comm)
            if dynamics is not None:
                self.dynamics.load_state_dict(dynamics)
        # the first step with optimizer state: the second of a new run, the next one of a resumed run
        # (frozen parameters, as peers' adapters and --welore leave, and tensor subclasses are beyond MemTracker:
        # such runs record the plan only)
        if not spec.method.peer and all(p.requires_grad for p in model.parameters()):
            self.memory = StepMemoryMeter(device, progress.step + (2 if progress.step == 0 and cfg.steps >= 2 else 1))
        self._write_run_files()
        return model, optimizer, scheduler, progress

    def _note_schedule(self, step: int) -> None:
        """Resuming with other ``--steps`` (or warmup) than the checkpoint's: say how the schedule moved."""
        assert self.checkpoint is not None
        saved = type(self.config).from_dict(upgrade(read_meta(self.checkpoint)["config"]))
        cfg = self.config
        note = schedule_note(step, (saved.steps, saved.warmup_steps), (cfg.steps, cfg.warmup_steps), cfg.min_lr_ratio)
        if note is not None and self.parallel.main:
            print(note, flush=True)

    def _train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress
    ) -> tuple[float, float, int]:
        """One optimizer step: forward and backward over the micro-batches, the gradient norm
        (clipped), then the policy: a non-finite loss or norm skips the step, weights and optimizer
        state untouched. Returns the mean loss (NaN if skipped), the gradient norm and the units."""
        if self.dynamics is not None:  # rows carry the trainer's step number (layer-wise steps run in backward)
            self.dynamics.step = progress.step + 1
        meter = self.memory if self.memory is not None and self.memory.wants(progress.step + 1) else None
        measuring: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if meter is not None:  # the task's corpus is counted apart: batches are views of it
            measuring = meter.measure(model, optimizer, tuple(getattr(self.task, "resident_tensors", tuple)()))
        with measuring:
            loss, finite, units = self._forward_backward(model, progress, meter)
            finite, norm = self._gradient_norm(optimizer, finite)
            if self.dynamics is not None:
                self.dynamics.observe_grad_norm(progress.step + 1, norm)
            applied = self.skips.admit(progress, applied=finite, norm=norm)
            if applied:
                optimizer.step()  # a no-op with --layerwise: every parameter was stepped in backward
                progress.seen += units
            optimizer.zero_grad(set_to_none=True)
        return (loss if applied else math.nan), norm, units

    def _forward_backward(
        self, model: nn.Module, progress: Progress, meter: StepMemoryMeter | None = None
    ) -> tuple[float, bool, int]:
        """Backward over ``grad_accum`` micro-batches (this rank's slice of each); the mean loss over
        ranks, whether every rank's loss was finite, and the units (tokens or examples) of all ranks."""
        cfg, task, parallel = self.config, self.task, self.parallel
        device = parallel.device(cfg.device)
        total, units, finite = 0.0, 0, True
        for micro in range(cfg.grad_accum):
            start = parallel.shard(progress.position, cfg.batch_size)
            batch = {k: v.to(device) for k, v in task.batch(start, cfg.batch_size).items()}
            progress.position += cfg.batch_size * parallel.world
            units += task.count(batch) * parallel.world
            with self._autocast(), parallel.sync(last=micro == cfg.grad_accum - 1):
                loss = task.loss(self.train_model or model, batch) / cfg.grad_accum
                if not torch.isfinite(loss):
                    finite = False
                    if not parallel.collective:
                        continue
                # with --layerwise, the last micro-batch's backward steps every parameter; under DDP every
                # rank runs backward (collectives must line up): a NaN reaches the averaged gradient instead
                loss.backward()
            if meter is not None:
                meter.after_backward(model, micro == 0, self.stepper)
            total += float(loss.detach())
        return parallel.mean(total), parallel.every(finite), units

    def _gradient_norm(self, optimizer: torch.optim.Optimizer, finite_loss: bool) -> tuple[bool, float]:
        """Whether the step may go through so far, and the global gradient norm (clipped to
        ``--clip``). Layer-wise, the parameters were stepped in backward: a non-finite loss stopped
        before backward (the partial accumulation is dropped), and a non-finite gradient skipped
        only its own parameter (the others were already stepped)."""
        stepper = self.stepper
        if stepper is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip = self.config.clip if self.config.clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, clip)  # FSDP2: a DTensor of the global norm
            return finite_loss, float(norm.full_tensor() if is_sharded(norm) else norm)  # type: ignore[attr-defined]
        if not finite_loss:
            stepper.discard()
            return False, math.nan
        skipped = stepper.last_step_skipped
        if skipped:
            print(f"gradproj: {skipped} parameter(s) with a non-finite gradient were not stepped", flush=True)
        return not skipped, stepper.grad_norm

    # -- pieces ---------------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, progress: Progress, logger: RunLogger) -> dict[str, float]:
        model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(model)
        if self.config.fsdp:  # FSDP2 keeps the root's weights gathered after a forward without backward
            model.reshard()  # type: ignore[operator]
        model.train()
        logger.write("eval", progress.step, metrics)
        progress.history.append({"step": progress.step, **metrics})
        return metrics

    def _save(self, model: nn.Module, optimizer: Any, scheduler: Any, progress: Progress, logger: RunLogger) -> Path:
        """Rank 0 writes (every rank holds the same weights and state) while the others wait; under
        ``--fsdp`` every rank writes its shards. The dynamics rows so far are logged first, so the saved
        spike statistics are those of the logged rows."""
        state: dict[str, Any] = {k: v for k, v in progress.__dict__.items()}
        if self.dynamics is not None:
            logger.write_dynamics(self.dynamics.drain())
            state["dynamics"] = self.dynamics.state_dict()
        meta = {
            "config": self.config.to_dict(),
            "resolved_rank": self.rank,  # what an unset --rank resolved to (its message on a refused resume)
            "task": self.task.describe(),
            "world_size": self.parallel.world,
        }
        args = (self.run_dir, progress.step, model, optimizer, scheduler, state)
        if self.config.fsdp:
            return save_sharded_checkpoint(*args, keep=self.config.keep, meta=meta)
        path = self.run_dir / "checkpoints" / f"step-{progress.step:08d}"
        if self.parallel.main:
            path = save_checkpoint(*args, keep=self.config.keep, meta=meta)
        self.parallel.barrier()
        return path

    def _export(self, model: nn.Module, checkpoint: Path | None) -> str | None:
        """The final model as a Hugging Face folder (``RUN/model``), by rank 0: the live model, or under
        ``--fsdp`` the final checkpoint read back (its shards, once); None without one."""
        from .export import MODEL_DIR, export_checkpoint, write_model_folder

        out = self.run_dir / MODEL_DIR
        if not self.config.export or (self.config.fsdp and checkpoint is None):
            return None  # nothing to read the shards from (--no-checkpoints); gradproj export needs a checkpoint
        if self.parallel.main:
            if self.config.fsdp:
                export_checkpoint(checkpoint, out)  # type: ignore[arg-type]
            else:
                write_model_folder(model, self.task.export_tokenizer(), out)
        self.parallel.barrier()
        return str(out)

    def _write_run_files(self) -> None:
        if not self.parallel.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from .export import TOKENIZER_DIR

        self.task.export_tokenizer().save_pretrained(str(self.run_dir / TOKENIZER_DIR))  # gradproj export reads it
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
