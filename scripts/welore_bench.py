"""WeLore on a model gradproj trained: compression at several sizes, WeLore's non-uniform ranks against
uniform-rank SVD truncation at the same size (held-out perplexity of each), then fine-tuning of the
WeLore-compressed model on the offline causal-LM task (BBC News as "Article: ... Category:" -> label), AdamW,
four ways: every weight (``full``); every matrix and norm with the embeddings and head frozen (``matrices``:
the authors' full fine-tuning baseline, whose script freezes those for both); the low-rank components'
factors and the norms (``lrc``: ``--welore``); the factors alone (``lrc-factors``). Each at its best rate over a
sweep (seed 0), then more seeds.

    gradproj pretrain --model llama-20m --steps 2000 --out runs/welore-base
    python scripts/welore_bench.py runs/welore-base docs/records/welore_llama20m_cpu.jsonl
    python scripts/welore_bench.py runs/welore-base RECORDS --skip-compression   # fine-tuning only, again

Appends one record per compression and per fine-tuning run; docs/BENCHMARKS.md's tables are generated from
them (``gradproj bench docs docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gradproj.bench.welore import MODES
from gradproj.compress_cli import compress
from gradproj.optim.build import OptimizerSpec
from gradproj.train import FinetuneConfig
from gradproj.train.loop import Trainer
from gradproj.train.sft import CausalLMTask


def save(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """Append ``record`` to the records file at once (a long run that stops keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def compressions(base: str, work: Path, ratios: list[float], seq_len: int, out: Path) -> None:
    for ratio in ratios:
        for method in ("welore", "uniform"):
            folder = work / f"{method}-{ratio}"
            args = argparse.Namespace(model=base, out=str(folder), ratio=ratio, method=method, data=None,
                                      seq_len=seq_len, eval_tokens=65536)  # fmt: skip
            data = compress(args)
            matrices = data["matrices"].values()
            save({
                "kind": "compress", "model": base, "method": method, "ratio": ratio,
                "kept": data["matrix_parameters"]["kept"], "low_rank": sum(m["low_rank"] for m in matrices),
                "matrices": len(matrices), "ppl_before": data["heldout_ppl"]["before"],
                "ppl_after": data["heldout_ppl"]["after"],
            }, out)  # fmt: skip


class FrozenEmbeddings(CausalLMTask):
    """The authors' full fine-tuning: the model's embeddings and head frozen, everything else trained."""

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        for table in (model.get_input_embeddings(), model.get_output_embeddings()):  # type: ignore[operator]
            table.weight.requires_grad_(False)
        return model


class FactorsOnly(CausalLMTask):
    """``--welore`` with the norms frozen too: only the low-rank components' two factors train."""

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        for p in model.parameters():
            if p.dim() == 1:
                p.requires_grad_(False)
        return model


#: the task class of each fine-tuning mode of :data:`gradproj.bench.welore.MODES`
TASKS = {"full": CausalLMTask, "matrices": FrozenEmbeddings, "lrc": CausalLMTask, "lrc-factors": FactorsOnly}


def finetune_run(compressed: Path, mode: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    config = FinetuneConfig(
        task="causal-lm", model=str(compressed), welore=mode.startswith("lrc"),
        optim=OptimizerSpec(name="adamw", lr=lr, other_lr=lr), steps=args.steps, batch_size=16, eval_every=0,
        seed=seed, out=str(args.work / f"ft-{mode}-{lr}-{seed}"),
    )  # fmt: skip
    config = replace(config, save_every=0, checkpoints=False, export=False, progress=False, tensorboard=False)
    result = Trainer(config, TASKS[mode](config)).run()
    return save({
        "kind": "finetune", "task": "sft-bbc", "model": str(compressed), "mode": mode, "lr": lr, "seed": seed,
        "steps": args.steps, "loss": result.final_eval["loss"], "exact_match": result.final_eval.get("exact_match"),
        "optimizer_state_bytes": result.summary["optimizer_state_bytes"],
        "trainable": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
        "seconds": result.summary["seconds"],
    }, args.out)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a gradproj pretrain run folder")
    parser.add_argument("out", type=Path, help="records file (appended)")
    parser.add_argument("--work", type=Path, default=Path("runs/welore-bench"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--ratio", type=float, default=0.5, help="the compressed model that is fine-tuned")
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of 16 examples")
    parser.add_argument("--seq-len", type=int, default=128, help="evaluation windows of the compressions")
    parser.add_argument("--skip-compression", action="store_true", help="fine-tune the compressed models in --work")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    if not args.skip_compression:
        compressions(args.base, args.work, args.ratios, args.seq_len, args.out)
    compressed = args.work / f"welore-{args.ratio}"
    for mode in args.modes:
        sweep = [finetune_run(compressed, mode, lr, args.seeds[0], args) for lr in args.rates]
        best = min(sweep, key=lambda r: r["loss"])["lr"]
        for seed in args.seeds[1:]:
            finetune_run(compressed, mode, best, seed, args)


if __name__ == "__main__":
    main()
