"""Every FSDP-capable method re-shards: 4 steps on 2 ranks, resumed from step 2 as one process.

    torchrun --standalone --nproc-per-node 2 scripts/fsdp_reshard.py write OUT
    python scripts/fsdp_reshard.py check OUT

``check`` prints, per method, the largest weight difference at step 4 between the resumed run and the
2-rank run, next to the difference between the 2-rank run and one process trained from the start
(no checkpoint: the float noise of another world size), so the two can be compared.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fsdp_train_worker as worker  # noqa: E402  (the test suite's tiny run)

from gradproj.cli import build_parser, main  # noqa: E402
from gradproj.train.sharded_checkpoint import consolidated_weights  # noqa: E402

RUN = [*worker.TINY, "--steps", "4", "--save-every", "2"]


def write(out: Path) -> None:
    import torch.distributed as dist

    from gradproj.distributed import init_from_env
    from gradproj.train.cli import run

    init_from_env()
    for name in worker.fsdp_methods():
        argv = ["pretrain", *RUN, "--fsdp", "--batch-size", "4", "--optimizer", name, "--out", str(out / name)]
        assert run(build_parser().parse_args(argv)) == 0, name
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def _largest(a: dict, b: dict) -> float:  # type: ignore[type-arg]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check(out: Path) -> None:
    from safetensors.torch import load_file

    rows = ["| method | resumed on 1 vs 2 ranks | 1 process vs 2 ranks, no checkpoint |", "|---|---|---|"]
    for name in worker.fsdp_methods():
        resumed = out / "resumed" / name
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(out / name / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
        two = consolidated_weights(out / name / "checkpoints" / "step-00000004")
        if main(["pretrain", "--resume", str(resumed)]) != 0:
            rows.append(f"| {name} | refused | |")
            continue
        single = out / "single" / name
        main(["pretrain", *RUN, "--batch-size", "8", "--optimizer", name, "--out", str(single)])
        plain = load_file(str(single / "checkpoints" / "step-00000004" / "model.safetensors"))
        again = consolidated_weights(resumed / "checkpoints" / "step-00000004")
        rows.append(f"| {name} | {_largest(again, two):.1e} | {_largest(plain, two):.1e} |")
    print("\n".join(rows))


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](Path(sys.argv[2]))
