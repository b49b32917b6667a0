"""Step-by-step check of gradproj's WeLore against the authors' code (VITA-Group/WeLore).

Their code is not on PyPI, so the test suite cannot import it; this script takes the repository's folder and
runs the two pieces that define the method beside ours, on the spectra and weights of a model:

* the ranks (``utils.adaptive_rank_pruning``): given one threshold, how many directions each matrix loses
  (their normalised spectrum below the threshold) against ours (:func:`gradproj.welore.normalized`, kept where
  at or above it), at thresholds across the range;
* the factors (``lib/LowRankLayer.LowRankLayer``): ``U_k sqrt(S_k)`` and ``sqrt(S_k) V_k^T``, theirs stored in
  bfloat16, against ours (:func:`gradproj.welore.truncate`) rounded the same way, and each layer's output.

    python scripts/check_welore_authors.py /path/to/WeLore [RUN_OR_MODEL]

Without a model it uses a randomly initialised llama-tiny. Where we differ on purpose (how the threshold is
found, which matrices count as low-rank components, what the compressed folder holds) is in
docs/ALGORITHMS.md; none of it is in these two pieces.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

from gradproj.compress_cli import spectra_of
from gradproj.welore import normalized, truncate


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def model_of(name: str | None) -> torch.nn.Module:
    if name is not None:
        from gradproj.train.models import pretrained_causal_lm

        return pretrained_causal_lm(name, name)
    from gradproj.train.models import build_causal_lm

    return build_causal_lm("llama-tiny", vocab_size=256, seq_len=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, help="a checkout of VITA-Group/WeLore")
    parser.add_argument("model", nargs="?", default=None, help="a run folder or model folder (default: llama-tiny)")
    args = parser.parse_args()
    utils = load(args.repository / "utils.py", "authors_welore_utils")
    layers = load(args.repository / "lib" / "LowRankLayer.py", "authors_welore_layers")
    model = model_of(args.model).float()
    spectra, _ = spectra_of(model)
    # their rank_analysis_weight keys the spectra by layer index, then by the module's name inside the layer
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, values in spectra.items():
        index = int(name.split(".")[2])  # model.layers.I.self_attn.q_proj
        by_layer.setdefault(index, {})[".".join(name.split(".")[3:])] = values
    quiet = logging.getLogger("check")
    worst = 0
    for tau in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5):
        theirs = utils.adaptive_rank_pruning(argparse.Namespace(rank_thresold=tau), tau, by_layer, quiet)
        for name, values in spectra.items():
            index, inner = int(name.split(".")[2]), ".".join(name.split(".")[3:])
            ours = len(values) - int((normalized(values.double()) >= tau).sum())
            worst = max(worst, abs(int(theirs[index][inner]) - ours))
    print(f"ranks: {len(spectra)} matrices at 6 thresholds; largest difference in directions dropped: {worst}")
    largest_factor, largest_output = 0.0, 0.0
    for name in spectra:
        weight = model.get_submodule(name).weight.detach()
        rank = max(1, min(weight.shape) // 3)
        layer = layers.LowRankLayer(rank, weight.clone(), False)
        up, down = truncate(weight, rank)
        product_theirs = layer.U.weight.float() @ layer.V.weight.float()
        product_ours = up.to(torch.bfloat16).float() @ down.to(torch.bfloat16).float()
        largest_factor = max(largest_factor, float((product_theirs - product_ours).abs().max() / weight.abs().max()))
        x = torch.randn(4, weight.shape[1])
        ours_out = torch.nn.functional.linear(
            torch.nn.functional.linear(x.to(torch.bfloat16), down.to(torch.bfloat16)), up.to(torch.bfloat16)
        )
        largest_output = max(largest_output, float((layer(x).float() - ours_out.float()).abs().max()))
    print(f"factors at a third of each rank: U V products differ by at most {largest_factor:.3g} of the largest "
          f"weight; layer outputs (both in bfloat16) by at most {largest_output:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
