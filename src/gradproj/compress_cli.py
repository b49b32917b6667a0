"""``gradproj compress``: a causal LM at a share of its attention/MLP parameters, by WeLore's non-uniform ranks
(:mod:`gradproj.welore`) or one rank fraction everywhere, written as a Hugging Face folder.

The folder holds the standard architecture with every low-rank component's weight replaced by its rank-``k``
truncation (so ``AutoModelForCausalLM.from_pretrained`` loads it anywhere, with no code of ours), the
tokenizer, and ``welore.json``: each matrix's shape, kept rank, whether it is a low-rank component and its
singular values. ``gradproj finetune --task causal-lm --model OUT --welore`` reads it to train the
components' factors alone; ``gradproj report OUT`` draws the spectra.

Example::

    gradproj compress runs/pretrain-galore_adamw-20261207 --ratio 0.5 runs/compressed
    gradproj compress runs/pretrain-galore_adamw-20261207 --ratio 0.5 --method uniform runs/uniform
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .welore import MANIFEST, METHODS, MatrixPlan, check_ratio, truncate, uniform_ranks, welore_ranks


def spectra_of(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """The singular values (float32, descending) and shapes of the attention/MLP matrices, by module name."""
    from .optim.groups import target_weights

    spectra, shapes = {}, {}
    for name, weight in target_weights(model).items():
        module = name.removesuffix(".weight")
        spectra[module] = torch.linalg.svdvals(weight.detach().float())  # min(m, n)
        shapes[module] = (int(weight.shape[0]), int(weight.shape[1]))
    return spectra, shapes


def plan_model(model: nn.Module, ratio: float, method: str) -> tuple[dict[str, MatrixPlan], dict[str, torch.Tensor]]:
    """Each attention/MLP matrix's :class:`~gradproj.welore.MatrixPlan` at ``ratio`` by ``method``, and the spectra."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not valid; expected one of {METHODS}")
    spectra, shapes = spectra_of(model)
    plans = welore_ranks(spectra, shapes, ratio) if method == "welore" else uniform_ranks(shapes, ratio)
    return plans, spectra


@torch.no_grad()
def apply_plan(model: nn.Module, plans: dict[str, MatrixPlan]) -> None:
    """Replace every low-rank component's weight by its rank-``k`` truncation, in place."""
    for name, plan in plans.items():
        if plan.low_rank:
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear), name
            weight = linear.weight
            up, down = truncate(weight, plan.rank)
            weight.copy_((up @ down).to(weight.dtype))  # m x n, rank k


def manifest(
    plans: dict[str, MatrixPlan], spectra: dict[str, torch.Tensor], method: str, ratio: float
) -> dict[str, Any]:
    dense = sum(p.shape[0] * p.shape[1] for p in plans.values())
    kept = sum(p.parameters for p in plans.values())
    return {
        "method": method,
        "ratio": ratio,
        "matrix_parameters": {"dense": dense, "compressed": kept, "kept": kept / dense},
        "matrices": {
            name: {
                "shape": list(p.shape),
                "rank": p.rank,
                "low_rank": p.low_rank,
                "singular_values": spectra[name].tolist(),
            }
            for name, p in plans.items()
        },
    }


@torch.no_grad()
def heldout_perplexity(model: nn.Module, tokenizer_folder: str, data: str | None, seq_len: int, tokens: int) -> float:
    """Perplexity of ``model`` over up to ``tokens`` held-out tokens of ``data`` (default: the embedded plays)."""
    from .train.pretrain import heldout_loss
    from .train.text import prepare_pretrain_data

    prepared = prepare_pretrain_data(data, tokenizer_folder, 0, seq_len)
    count = max(1, min(tokens // seq_len, prepared.validation.windows))
    windows = torch.stack([prepared.validation.window(i) for i in range(count)])  # count x (seq_len + 1)
    mean, _ = heldout_loss(model, windows)
    return math.exp(min(mean, 50.0))


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a causal LM with WeLore's non-uniform ranks (or one rank fraction) to a share of its size",
        description="Keep RATIO of the attention/MLP matrices' parameters: WeLore picks each matrix's rank from the "
        "heavy tail of its singular values (one threshold for the whole model); --method uniform keeps the same "
        "share of every matrix's rank (plain SVD truncation). Writes a Hugging Face folder (from_pretrained loads it) "
        "and welore.json, and prints the held-out perplexity before and after.",
        epilog=__doc__.split("Example::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="a gradproj run folder (its final model), a Hugging Face folder or name")
    p.add_argument("out", help="the folder to write (a new one, or an earlier export's, which is replaced)")
    p.add_argument("--ratio", type=float, required=True, help="share of the matrices' parameters to keep, in (0, 1)")
    p.add_argument("--method", default="welore", choices=METHODS, help="how ranks are chosen (default welore)")
    p.add_argument("--data", default=None, help="held-out text to evaluate on (default: the embedded plays)")
    p.add_argument("--seq-len", type=int, default=128, help="evaluation window length in tokens (default 128)")
    p.add_argument(
        "--eval-tokens", type=int, default=65536, help="held-out tokens to evaluate (default 65536; 0: skip)"
    )


def compress(args: argparse.Namespace) -> dict[str, Any]:
    """Load, plan, evaluate, truncate, evaluate, write; returns the manifest with the perplexities."""
    from transformers import AutoTokenizer

    from .train.export import check_model_destination, model_folder, write_model_folder
    from .train.models import pretrained_causal_lm

    check_ratio(args.ratio)
    check_model_destination(Path(args.out), "OUT")
    folder = model_folder(args.model)
    model = pretrained_causal_lm(folder, f"gradproj compress {args.model}").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plans, spectra = plan_model(model, args.ratio, args.method)

    def ppl() -> float | None:
        return (
            heldout_perplexity(model, folder, args.data, args.seq_len, args.eval_tokens) if args.eval_tokens else None
        )

    before = ppl()
    apply_plan(model, plans)
    data = manifest(plans, spectra, args.method, args.ratio)
    data["heldout_ppl"] = {"before": before, "after": ppl()}
    out = write_model_folder(model, tokenizer, Path(args.out))
    (out / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")
    return data


def summary(data: dict[str, Any], out: str) -> str:
    matrices = data["matrices"]
    lrcs = [m for m in matrices.values() if m["low_rank"]]
    share = data["matrix_parameters"]
    lines = [
        f"compressed  {len(lrcs)} of {len(matrices)} matrices are low-rank components ({data['method']}); "
        f"matrix parameters {share['compressed']:,} of {share['dense']:,} ({share['kept']:.3f})",
    ]
    for name, m in matrices.items():
        full = min(m["shape"])
        kind = f"rank {m['rank']:>4} of {full}" if m["low_rank"] else f"dense ({full})"
        lines.append(f"  {name:<40} {'x'.join(map(str, m['shape'])):>10}  {kind}")
    before, after = data["heldout_ppl"]["before"], data["heldout_ppl"]["after"]
    if before is not None:
        lines.append(f"held-out    perplexity {before:.2f} before, {after:.2f} after")
    lines.append(f"written     {out} (AutoModelForCausalLM.from_pretrained; {MANIFEST} for --welore)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        data = compress(args)
    except ValueError as error:
        print(f"gradproj compress: error: {error}", file=sys.stderr)
        return 2
    print(summary(data, args.out))
    return 0
