"""Causal-LM fine-tuning on the offline default (BBC News as "Article: ... Category:" -> label) of a
model gradproj pre-trained, for GaLore and AdamW at their default and 3x learning rates, two seeds:
held-out exact match against the model before fine-tuning and against the majority answer.

    gradproj pretrain --out runs/base                  # llama-5m on Shakespeare, the README's demo run
    python scripts/sft_bbc.py runs/base docs/records/sft_bbc_cpu.jsonl

Appends one record per run (and one for the model before fine-tuning); docs/TRAINING.md's table is
generated from them (``gradproj bench docs docs/TRAINING.md``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from gradproj.optim.build import OptimizerSpec
from gradproj.train import FinetuneConfig
from gradproj.train.finetune import finetune
from gradproj.train.sft import CausalLMTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a gradproj pretrain run folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 3.0], help="learning rates x the default")
    args = parser.parse_args()
    base = FinetuneConfig(task="causal-lm", model=args.base, steps=args.steps, batch_size=16, eval_every=0)
    base = replace(base, save_every=0, checkpoints=False, export=False, progress=False, tensorboard=False)
    task = CausalLMTask(base)
    before = task.evaluate(task.build_model().eval())
    records = [{"method": "before fine-tuning", **before, "majority_share": task.describe()["majority_share"]}]
    for method in ("galore_adamw", "adamw"):
        default = replace(base, optim=OptimizerSpec(name=method)).optimizer_spec()
        for factor in args.factors:
            for seed in args.seeds:
                spec = replace(default, lr=default.lr * factor, other_lr=default.other_lr * factor)  # type: ignore[operator]
                config = replace(base, optim=spec, seed=seed, out=f"/tmp/sft-bbc/{method}-{factor}-{seed}")
                result = finetune(config)
                records.append(
                    {"method": method, "lr": spec.lr, "other_lr": spec.other_lr, "seed": seed, "steps": args.steps,
                     **result.final_eval, "majority_share": result.summary["majority_share"],
                     "optimizer_state_bytes": result.summary["optimizer_state_bytes"]}
                )  # fmt: skip
                print(json.dumps(records[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        for record in records:
            handle.write(json.dumps({"model": args.base, **record}) + "\n")


if __name__ == "__main__":
    main()
