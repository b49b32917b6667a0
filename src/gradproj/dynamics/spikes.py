"""Gradient-norm spikes and the running statistics they are judged by, as plain, checkpointable state.

The global gradient norm of each step is compared with the mean of the previous ``window`` steps (a
true running mean over a window); a norm above ``factor`` times it is a spike. Each layer's sampled
gradient norm is compared with an exponential moving average of its earlier samples (``EMA_DECAY``).
:meth:`SpikeDetector.state_dict` holds only lists, dicts and floats, so the trainer saves it in every
checkpoint and a resumed run judges spikes as the uninterrupted run would, whatever its ``--out``.

Example:
    >>> detector = SpikeDetector(factor=3.0, window=20)
    >>> rows = [detector.judge(step, 1.0) for step in range(1, 15)]
    >>> detector.judge(15, 10.0)["ratio"]
    10.0
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

#: weight of the previous value in a layer's gradient-norm EMA
EMA_DECAY = 0.8
#: global norms seen before any spike is called (the running mean needs a history)
MIN_HISTORY = 10


class SpikeDetector:
    """Judges global gradient norms against their running mean; tracks each layer's norm EMA."""

    def __init__(self, *, factor: float = 3.0, window: int = 50) -> None:
        if factor <= 1:
            raise ValueError(f"spike_factor={factor} is not valid; expected a number > 1")
        if window < 1:
            raise ValueError(f"window={window} is not valid; expected an integer >= 1")
        self.factor = factor
        self.norms: deque[float] = deque(maxlen=window)
        self.layer_ema: dict[str, float] = {}

    def judge(self, step: int, norm: float) -> dict[str, Any] | None:
        """A spike row if ``norm`` (step ``step``'s global norm) is a spike, else None; ``norm`` joins the window."""
        if not math.isfinite(norm):
            return None  # kept out of the running mean
        mean = self.running_mean()
        self.norms.append(norm)
        if mean is None or len(self.norms) <= MIN_HISTORY or norm <= self.factor * mean:
            return None
        return {"kind": "spike", "step": step, "grad_norm": norm, "running_mean": mean, "ratio": norm / mean}

    def running_mean(self) -> float | None:
        return sum(self.norms) / len(self.norms) if self.norms else None

    def layer_ratio(self, layer: str, norm: float) -> float | None:
        """``norm`` over the layer's EMA of earlier samples (None for its first sample); updates the EMA."""
        previous = self.layer_ema.get(layer)
        self.layer_ema[layer] = norm if previous is None else EMA_DECAY * previous + (1 - EMA_DECAY) * norm
        return None if previous is None else norm / max(previous, 1e-30)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "layer_ema": dict(self.layer_ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms.clear()
        self.norms.extend(float(x) for x in state["norms"])
        self.layer_ema = {str(k): float(v) for k, v in state["layer_ema"].items()}
