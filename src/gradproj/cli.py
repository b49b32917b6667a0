"""The ``gradproj`` command.

gradproj pretrain                     # a LLaMA on Shakespeare with GaLore: checkpoints, resume, logs
gradproj finetune                     # all-MiniLM-L6-v2 on BBC News

gradproj demo                         # GaLore, Fira, APOLLO-Mini vs AdamW on Shakespeare (CPU, minutes)
gradproj memory --model llama-7b      # plan weights, gradients, optimizer state and activations
gradproj bench quality --device cuda  # every method and peer side by side, learning-rate sweep
gradproj bench table runs/quality.jsonl --plots runs/figures
gradproj bench refresh                # svd vs rsvd vs dct vs random basis refreshes
gradproj report RUN_DIR [RUN_B]       # HTML page of a run's loss and training dynamics
gradproj generate RUN_DIR --prompt "ROMEO:"   # text from the model a run trained (RUN_DIR/model)
gradproj export CHECKPOINT --out DIR  # any checkpoint as a Hugging Face folder
gradproj compress RUN_DIR --ratio 0.5 OUT   # WeLore: non-uniform ranks from the weights' spectra
"""

from __future__ import annotations

import argparse
import os
import sys

from .bench.cli import add_parsers as add_bench_parsers
from .bench.cli import run as run_bench
from .compress_cli import add_parser as add_compress_parser
from .compress_cli import run as run_compress
from .memory_cli import add_parser as add_memory_parser
from .memory_cli import run as run_memory
from .report import add_parser as add_report_parser
from .report import run as run_report
from .train.cli import add_parsers as add_train_parsers
from .train.cli import run as run_training
from .train.export import add_parser as add_export_parser
from .train.export import run as run_export
from .train.generate import add_parser as add_generate_parser
from .train.generate import run as run_generate


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
    add_export_parser(sub)
    add_compress_parser(sub)
    add_generate_parser(sub)
    add_bench_parsers(sub)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("pretrain", "finetune"):
        return run_training(args)
    if args.command == "memory":
        return run_memory(args)
    if args.command == "report":
        return run_report(args)
    if args.command == "export":
        return run_export(args)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "compress":
        return run_compress(args)
    return run_bench(args)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: everything is saved and flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: gloo's threads sometimes abort there after a clean run
    sys.exit(code)
