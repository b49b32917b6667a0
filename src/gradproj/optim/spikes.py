"""Gradient policies: what happens to each gradient before the projector and the rule see it.

``spike_policy="stable_spam"`` is Stable-SPAM (Huang et al. 2025, "Stable-SPAM: How to Train in 4-Bit More
Stably than 16-Bit Adam", Alg. 1) as a policy any preset runs, projected groups and full ones alike. For
the ``t``-th gradient ``g`` of a parameter:

1. AdaClip: ``m_max = lerp(m_max, max|g|, 1 - theta)``; every entry above ``m_max / (1 - theta^t)`` is
   scaled onto it (``g / max|g| * threshold``): the spike threshold follows the gradient's own maxima;
2. AdaGN: ``m = lerp(m, ||g||, 1 - gamma1)``, ``v = lerp(v, ||g||^2, 1 - gamma2)`` and
   ``g = g / ||g|| * m_hat / (sqrt(v_hat) + eps)`` (bias-corrected): the whole matrix is rescaled to its
   historical norm statistics;
3. every ``spam_reset_gap`` steps (``t`` a multiple of it) the rule's moments are zeroed and its bias
   correction restarts (SPAM's momentum reset; 0: never).

The policy rewrites the gradient in place, as the authors' code and ``pytorch_optimizer.StableSPAM`` do,
so no copy of a gradient is held; it runs before anything else reads the gradient (the refresh's basis,
the adaptive refresh's signal, FSDP2's shared refreshes), so every part of the step sees the same one.
Its statistics are 0-d tensors in each parameter's state (no device sync; a resumed run continues in
lockstep), with the entries clipped and the resets counted there. Under FSDP2 the maximum and the norm
are taken over every rank's rows (two all-reduces), so every rank makes the same decision; under DDP
every rank holds the same averaged gradient and decides alike by construction.

Example:
    >>> import torch
    >>> state, group = {}, {**SPIKE_DEFAULTS, "spike_policy": "stable_spam", "eps": 1e-8}
    >>> grad = torch.tensor([[3.0, 4.0]])
    >>> police(grad, state, group)   # the first gradient is rescaled to unit norm
    False
    >>> [round(x, 4) for x in grad.flatten().tolist()]
    [0.6, 0.8]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..options import defaults_of, fraction, option, view
from ..rules.base import ALL_ROWS, Rows
from .component import GradientPolicy


@dataclass(frozen=True)
class StableSpamOptions:
    """Stable-SPAM's options: pytorch_optimizer.StableSPAM's defaults (its ``update_proj_gap`` is our
    ``spam_reset_gap``, since GaLore's key means the refresh gap here).

    >>> StableSpamOptions(spam_reset_gap=-1)
    Traceback (most recent call last):
    ...
    ValueError: spam_reset_gap=-1 is not valid; expected an integer >= 0 (0: never reset)
    """

    spam_gamma1: float = option(0.7, help="decay of the gradient norm's mean, in [0, 1)", minimum=0)
    spam_gamma2: float = option(0.9, help="decay of the squared gradient norm's mean, in [0, 1)", minimum=0)
    spam_theta: float = option(0.999, help="decay of the maxima's mean, the clipping threshold, in [0, 1)", minimum=0)
    spam_reset_gap: int = option(1000, help="steps between moment resets, 0 never", minimum=0)

    def __post_init__(self) -> None:
        for key in ("spam_gamma1", "spam_gamma2", "spam_theta"):
            fraction(key, getattr(self, key))
        gap = self.spam_reset_gap
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"spam_reset_gap={gap!r} is not valid; expected an integer >= 0 (0: never reset)")


#: what a group with a policy gets for the keys it does not set (its name, and Stable-SPAM's options)
SPIKE_DEFAULTS: dict[str, Any] = {"spike_policy": "none", **defaults_of(StableSpamOptions)}

#: the state keys the policy adds to a parameter's state
STATE_KEYS = ("spam_step", "spam_max", "spam_norm", "spam_norm_sq", "spam_clipped", "spam_resets")


def policed(group: dict[str, Any]) -> bool:
    """Whether ``group`` runs a gradient policy."""
    return group.get("spike_policy", "none") != "none"


class StableSpam(GradientPolicy):
    """Stable-SPAM's AdaClip, AdaGN and moment resets (the module's maths), as a gradient policy."""

    name = value = "stable_spam"
    transforms = True
    options_type = StableSpamOptions

    def check(self, group: dict[str, Any]) -> None:
        check_policy(group)

    def transform(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], rows: Rows) -> bool:
        return police(grad, state, group, rows)

    def state_bytes(self, shape: tuple[int, ...], group: dict[str, Any], dtype: torch.dtype) -> int:
        return policy_bytes(dtype)


def check_policy(group: dict[str, Any]) -> None:
    """The policy's keys: one clear message naming the bad value and what is valid (its name is checked
    against the registry: :func:`gradproj.optim.features.check_policy`)."""
    policy = group.get("spike_policy", "none")
    if policy == "none":
        return
    view(StableSpamOptions, group)
    if "eps" not in group or isinstance(group["eps"], (tuple, list)):
        raise ValueError(
            f"spike_policy={policy!r} needs an Adam-style group (one eps to rescale its moments by); "
            "Adafactor has a pair of them and no first moment by default"
        )


def init_policy_state(state: dict[str, Any], grad: Tensor) -> None:
    """Zeroed statistics in the dtype the policy computes in (float32 at least)."""
    dtype = torch.promote_types(grad.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=grad.device)
    state.update(spam_step=0, spam_max=zero, spam_norm=zero.clone(), spam_norm_sq=zero.clone())
    state.update(spam_clipped=torch.zeros((), dtype=torch.float64, device=grad.device), spam_resets=0)


def policy_bytes(dtype: torch.dtype) -> int:
    """Bytes of the statistics :func:`init_policy_state` creates for a gradient of ``dtype``: three numbers in
    the policy's dtype and the float64 count of clipped entries.

    >>> policy_bytes(torch.bfloat16), policy_bytes(torch.float64)
    (20, 32)
    """
    return 3 * torch.promote_types(dtype, torch.float32).itemsize + 8


def police(grad: Tensor, state: dict[str, Any], group: dict[str, Any], rows: Rows = ALL_ROWS) -> bool:
    """Clip and rescale ``grad`` (this process's rows of it) in place; returns whether this step resets the
    rule's moments (the caller resets them: it knows where they live)."""
    if "spam_step" not in state:
        init_policy_state(state, grad)
    state["spam_step"] += 1
    t = state["spam_step"]
    theta, gamma1, gamma2 = group["spam_theta"], group["spam_gamma1"], group["spam_gamma2"]
    wide = grad.to(state["spam_max"].dtype)  # the gradient itself unless it is bf16/fp16
    magnitude = wide.abs()
    largest = rows.maximum(magnitude.amax() if wide.numel() else wide.new_zeros(()))  # 0-d, every rank's
    state["spam_max"].lerp_(largest, 1 - theta)
    threshold = state["spam_max"] / (1 - theta**t)
    spiking = magnitude > threshold
    del magnitude
    clipped = torch.where(spiking, wide.div(largest).mul_(threshold), wide)  # the peer's order: g / max * threshold
    sums = rows.total(torch.stack((clipped.square().sum().double(), spiking.sum().double())))  # (2,)
    state["spam_clipped"].add_(sums[1])
    norm = sums[0].sqrt().to(wide.dtype)
    active = norm > 0  # an all-zero gradient leaves the norm statistics as they were, and stays zero
    state["spam_norm"].copy_(torch.where(active, state["spam_norm"].lerp(norm, 1 - gamma1), state["spam_norm"]))
    state["spam_norm_sq"].copy_(
        torch.where(active, state["spam_norm_sq"].lerp(norm.square(), 1 - gamma2), state["spam_norm_sq"])
    )
    mean = state["spam_norm"] / (1 - gamma1**t)
    root_mean_square = (state["spam_norm_sq"] / (1 - gamma2**t)).sqrt()
    target = torch.where(active, mean / (root_mean_square + group["eps"]), 1.0)
    grad.copy_(clipped.div_(torch.where(active, norm, 1.0)).mul_(target))  # g / ||g|| * m_hat / (sqrt(v_hat) + eps)
    gap = group["spam_reset_gap"]
    resets = gap > 0 and t % gap == 0
    if resets:
        state["spam_resets"] += 1
    return resets


def policy_totals(states: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Entries clipped and moment resets over ``states`` so far (one device transfer).

    >>> policy_totals([{"spam_step": 3, "spam_clipped": torch.tensor(3.0), "spam_resets": 1}, {}])
    {'clipped': 3, 'resets': 1}
    """
    watched = [s for s in states if "spam_step" in s]
    if not watched:
        return {"clipped": 0, "resets": 0}
    clipped = torch.stack([s["spam_clipped"].to(watched[0]["spam_clipped"].device) for s in watched]).sum()
    return {"clipped": int(clipped.item()), "resets": sum(int(s["spam_resets"]) for s in watched)}
