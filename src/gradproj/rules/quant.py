"""Block-wise 8-bit quantization of optimizer moments, via bitsandbytes.

We use bitsandbytes' public ``quantize_blockwise``/``dequantize_blockwise`` (the dynamic-tree
quantization of Dettmers et al., 2022, the same scheme as its 8-bit optimizers) because it runs
on CPU and CUDA and is the de-facto reference; torchao's equivalent helpers are internal API.
What we store is plain tensors: ``uint8`` codes plus one ``float32`` absmax per block. The
code book is a constant regenerated on demand, never stored.

Example:
    >>> import torch
    >>> x = torch.randn(1000)
    >>> codes, absmax = quantize(x, signed=True)
    >>> bool((dequantize(codes, absmax, signed=True) - x).abs().max() < 0.05)
    True
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

BLOCK_SIZE = 256


def _functional():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("8-bit optimizer states need bitsandbytes: pip install 'gradproj[8bit]'") from err
    return bnb_functional


@lru_cache(maxsize=8)
def _code(signed: bool, device: str) -> Tensor:
    return _functional().create_dynamic_map(signed=signed).to(device)


def quantize(x: Tensor, *, signed: bool) -> tuple[Tensor, Tensor]:
    """``x`` (any shape, any float dtype) -> ``(codes uint8 of x.shape, absmax float32 per block)``."""
    flat = x.detach().float().contiguous()
    codes, qstate = _functional().quantize_blockwise(flat, code=_code(signed, str(x.device)), blocksize=BLOCK_SIZE)
    return codes.view(x.shape), qstate.absmax.float()


def dequantize(codes: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """Inverse of :func:`quantize`, as float32."""
    out = _functional().dequantize_blockwise(
        codes.contiguous(), absmax=absmax, code=_code(signed, str(codes.device)), blocksize=BLOCK_SIZE
    )
    return out.view(codes.shape).float()


def absmax_numel(numel: int) -> int:
    """Number of absmax values for ``numel`` quantized elements."""
    return -(-numel // BLOCK_SIZE)


def is_available() -> bool:
    """Whether bitsandbytes can be imported."""
    try:
        _functional()
    except ImportError:
        return False
    return True


__all__ = ["BLOCK_SIZE", "absmax_numel", "dequantize", "is_available", "quantize", "torch"]
