"""WeLore (Jaiswal et al., 2024, "From GaLore to WeLore"): non-uniform ranks from the weights' own spectra,
and fine-tuning of the low-rank components alone.

After (GaLore) training, matrices differ in how low-rank their weights became. WeLore normalises each
matrix's singular values to ``[0, 1]`` (``(s - min s) / (max s - min s)``), drops, in every matrix, the
directions below one global threshold ``tau`` (the heavy tail), and picks ``tau`` so that the model
reaches a size. A matrix whose kept rank ``k`` makes its factors ``U_k sqrt(S_k)`` (``m x k``) and
``sqrt(S_k) V_k^T`` (``k x n``) smaller than the matrix itself (``k (m + n) < m n``) is a **low-rank
component** (LRC) and is replaced by its rank-``k`` truncation; the others (N-LRCs) stay dense and whole.
``ratio`` here is the share of the targeted matrices' parameters the compressed model keeps, counting an
LRC at ``k (m + n)``; :func:`uniform_ranks` is the baseline at the same size: one rank fraction for every
matrix (plain SVD truncation).

Fine-tuning the LRCs alone (WeLore-PEFT) trains their two factors (:class:`LowRankLinear`) and the model's
vectors (norms, biases), and freezes every other matrix: embeddings, head and the dense N-LRCs, as the authors'
code does; :func:`merge` turns the factors back into dense ``nn.Linear`` weights for export.

Example:
    >>> import torch
    >>> spectra = {"a": torch.tensor([9.0, 1.0, 0.5, 0.0]), "b": torch.tensor([4.0, 3.5, 3.0, 2.0])}
    >>> plan = welore_ranks(spectra, {"a": (4, 4), "b": (4, 4)}, ratio=0.75)
    >>> {name: (m.rank, m.low_rank) for name, m in plan.items()}   # a's tail is heavy: a keeps 1 direction
    {'a': (1, True), 'b': (4, False)}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: how a compressed model's ranks were chosen: WeLore's threshold, or one rank fraction for every matrix
METHODS = ("welore", "uniform")
#: the file beside a compressed model that says which matrices are low-rank components, at which rank
MANIFEST = "welore.json"


@dataclass(frozen=True)
class MatrixPlan:
    """One matrix's outcome: its shape, the rank it keeps and whether it is a low-rank component."""

    shape: tuple[int, int]
    rank: int  #: directions kept (the full rank ``min(m, n)`` for an N-LRC)
    low_rank: bool  #: an LRC: stored as rank-``rank`` factors, trained alone by WeLore-PEFT

    @property
    def parameters(self) -> int:
        """What the matrix costs compressed: ``rank (m + n)`` as factors, ``m n`` dense."""
        m, n = self.shape
        return self.rank * (m + n) if self.low_rank else m * n


def plan_of(shape: tuple[int, int], rank: int) -> MatrixPlan:
    """Keep ``rank`` directions of an ``m x n`` matrix if its factors are smaller than it; else keep it whole."""
    m, n = shape
    rank = max(1, min(rank, m, n))
    if rank * (m + n) < m * n:
        return MatrixPlan(shape, rank, True)
    return MatrixPlan(shape, min(m, n), False)


def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(
            f"--ratio {ratio!r} is not valid; expected a number in (0, 1): the share of the attention/MLP "
            "matrices' parameters the compressed model keeps"
        )


def normalized(spectrum: Tensor) -> Tensor:
    """WeLore's ``(s - min s) / (max s - min s)``: the largest value 1, the smallest 0 (all 1 if flat)."""
    low, high = spectrum.min(), spectrum.max()
    if high == low:
        return torch.ones_like(spectrum)
    return (spectrum - low) / (high - low)


def welore_ranks(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, MatrixPlan]:
    """WeLore's plan: in every matrix, the directions whose normalised singular value is at least one global
    threshold, the lowest threshold at which the model keeps at most ``ratio`` of its parameters."""
    check_ratio(ratio)
    scaled = {name: normalized(s.double()) for name, s in spectra.items()}

    def plan(tau: float) -> dict[str, MatrixPlan]:
        return {name: plan_of(shapes[name], int((s >= tau).sum())) for name, s in scaled.items()}

    thresholds = sorted({float(v) for s in scaled.values() for v in s} | {math.inf})
    return _fit(plan, thresholds, shapes, ratio)


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, MatrixPlan]:
    """The baseline: one share of each matrix's rank everywhere (``floor(share * min(m, n))``), the largest share
    at which the model keeps at most ``ratio`` of its parameters."""
    check_ratio(ratio)

    def plan(share: float) -> dict[str, MatrixPlan]:
        return {name: plan_of(shape, int(share * min(shape))) for name, shape in shapes.items()}

    shares = sorted({k / min(shape) for shape in shapes.values() for k in range(min(shape) + 1)}, reverse=True)
    return _fit(plan, shares, shapes, ratio)


def _fit(
    plan: Callable[[float], dict[str, MatrixPlan]], knobs: list[float], shapes: dict[str, tuple[int, int]], ratio: float
) -> dict[str, MatrixPlan]:
    """The first knob (in the order given: the model shrinks along it) whose plan keeps at most ``ratio`` of the
    dense parameters, found by bisection; refused, naming the least that can be kept, when none does."""
    budget = ratio * sum(m * n for m, n in shapes.values())

    def size(knob: float) -> int:
        return sum(p.parameters for p in plan(knob).values())

    if size(knobs[-1]) > budget:
        least = size(knobs[-1]) / sum(m * n for m, n in shapes.values())
        raise ValueError(
            f"--ratio {ratio} is below what rank 1 everywhere keeps ({least:.4f} of the matrices' parameters); "
            f"use a ratio in [{least:.4f}, 1)"
        )
    low, high = 0, len(knobs) - 1  # size(knobs[high]) fits; find the first that does
    while low < high:
        mid = (low + high) // 2
        if size(knobs[mid]) <= budget:
            high = mid
        else:
            low = mid + 1
    return plan(knobs[low])


def truncate(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(up, down)``: ``U_k sqrt(S_k)`` (``m x k``) and ``sqrt(S_k) V_k^T`` (``k x n``), computed in float32 (or
    the weight's float64), so that ``up @ down`` is the best rank-``k`` approximation of ``weight``."""
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.to(wide), full_matrices=False)  # m x r, r, r x n
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]  # m x k, k x n


class LowRankLinear(nn.Module):
    """A linear layer stored as two factors, ``y = x down^T up^T + bias``: a low-rank component under
    fine-tuning. :func:`merge` turns it back into an ``nn.Linear``."""

    #: the two matrices :func:`gradproj.param_groups` projects (each on its own) in place of one weight
    projected_weights = ("up", "down")

    def __init__(self, up: Tensor, down: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.up = nn.Parameter(up)  # m x k
        self.down = nn.Parameter(down)  # k x n
        self.bias = None if bias is None else nn.Parameter(bias)
        self.in_features, self.out_features = int(down.shape[1]), int(up.shape[0])

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)  # ... x m


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def factorize(model: nn.Module, ranks: dict[str, int], *, tolerance: float | None = 1e-3) -> int:
    """Replace each ``nn.Linear`` named in ``ranks`` (module names) by a :class:`LowRankLinear` of its rank-``k``
    factors, which train with the vectors (norms, biases); every other matrix (embeddings, head, the dense ones)
    is frozen, as in the authors' WeLore-PEFT. Returns the number of trainable parameters. With a ``tolerance``, a
    weight that is no longer rank ``k`` (its truncation loses more than that share of its norm) is refused."""
    for name, rank in ranks.items():
        parent, leaf = _parent(model, name)
        linear = getattr(parent, leaf)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not the nn.Linear a low-rank component replaces")
        weight = linear.weight.detach()
        if weight.is_meta:  # a skeleton to load a checkpoint into: the shapes only
            up, down = (
                torch.empty(weight.shape[0], rank, device="meta"),
                torch.empty(rank, weight.shape[1], device="meta"),
            )
        else:
            up, down = truncate(weight, rank)
            lost = float(
                torch.linalg.matrix_norm(up @ down - weight.to(up.dtype))
                / torch.linalg.matrix_norm(weight.to(up.dtype))
            )
            if tolerance is not None and lost > tolerance:
                raise ValueError(
                    f"{name} is no longer rank {rank} (its rank-{rank} truncation loses {lost:.2e} of its norm); "
                    "--welore fine-tunes the model gradproj compress wrote, unchanged (compress it again)"
                )
        bias = None if linear.bias is None else linear.bias.detach()
        setattr(parent, leaf, LowRankLinear(up.to(weight.dtype), down.to(weight.dtype), bias))
    for module in model.modules():
        for param_name, p in module.named_parameters(recurse=False):
            p.requires_grad_(p.dim() == 1 or (isinstance(module, LowRankLinear) and param_name in ("up", "down")))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Every :class:`LowRankLinear` back as an ``nn.Linear`` with weight ``up @ down`` (in place); returns ``model``."""
    factored = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    for name in factored:
        parent, leaf = _parent(model, name)
        low: LowRankLinear = getattr(parent, leaf)
        linear = nn.Linear(low.in_features, low.out_features, bias=low.bias is not None, device=low.up.device)
        with torch.no_grad():
            linear.weight = nn.Parameter((low.up @ low.down).to(low.up.dtype))  # m x n
            if low.bias is not None:
                linear.bias = nn.Parameter(low.bias.detach().clone())
        setattr(parent, leaf, linear)
    return model


def read_manifest(folder: str | Path, what: str) -> dict[str, Any]:
    """The ``welore.json`` of a compressed model folder; refused, naming ``what``, when there is none or it holds
    no low-rank component."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{what} has no low-rank components ({MANIFEST} not found in {folder}); make them with "
            f"`gradproj compress MODEL --ratio 0.5 OUT` and fine-tune OUT"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    if not any(m["low_rank"] for m in data["matrices"].values()):
        raise ValueError(f"{what} has no low-rank components: every matrix in {path} is kept dense")
    return data


def low_rank_components(data: dict[str, Any]) -> dict[str, int]:
    """Module name -> kept rank of every low-rank component of a manifest."""
    return {name: int(m["rank"]) for name, m in data["matrices"].items() if m["low_rank"]}
