"""Sharded checkpoints (``--fsdp``) with ``torch.distributed.checkpoint`` (DCP): every rank writes
its shards of the weights and of the optimizer state in parallel, and a run resumes on any number
of ranks, DCP re-sharding each tensor from the logical shapes it recorded.

A checkpoint folder holds DCP's files (``.metadata`` and one ``.distcp`` per rank) with

- ``model.*``: the weights, by parameter name;
- ``optim.<parameter name>.<key>``: every tensor of the optimizer state, a ``DTensor`` with the whole
  matrix's shape placed where each rank's block sits (:mod:`gradproj.optim.placement`);

and, written by rank 0, ``trainer.pt`` (what is equal on every rank: counters and seeds of the
optimizer state, its parameter groups and extras, the schedule, data position and RNG) and
``meta.json``. As for one-process checkpoints the folder is written under a temporary name and
renamed into place once every rank's shards and DCP's ``.metadata`` are on disk, so an interrupted
save never replaces the last good one.

Loading unpickles nothing that could run code: DCP's tensors load with ``torch.load(weights_only=True)``,
its ``.metadata`` through an unpickler that admits DCP's own record classes only (:class:`_MetadataUnpickler`),
and ``trainer.pt`` with ``weights_only=True``. DCP loads in place, so the optimizer state must exist
first with every key: a step on small random gradients creates it (its values are all overwritten).
"""

from __future__ import annotations

import enum
import io
import json
import math
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    _fsync_dir,
    _fsync_file,
    commit,
    error_reason,
    list_checkpoints,
    read_meta,
    rng_states,
    set_rng_states,
)

FORMAT = "dcp"
FILES = (".metadata", "trainer.pt", "meta.json")


def _sharded_tensor(value: Any) -> bool:
    """Whether a state value goes through DCP (re-shardable) rather than rank 0's ``trainer.pt``."""
    from ..optim.placement import is_sharded

    return isinstance(value, Tensor) and (is_sharded(value) or value.dim() > 0)


def _ordered(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, Tensor]]:
    """Each optimizer position's parameter name and parameter (as ``state_dict`` numbers them)."""
    names = {p: name for name, p in model.named_parameters()}
    return [(names[p], p) for group in optimizer.param_groups for p in group["params"]]


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    names: dict[Any, str] = {p: name for name, p in model.named_parameters()}
    return {
        f"{names[p]}.{key}": value
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if _sharded_tensor(value)
    }


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    *,
    keep: int = 3,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` from every rank (a collective) and keep the newest ``keep``."""
    from torch.distributed.checkpoint import FileSystemWriter

    rank = dist.get_rank()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    box = [f".step-{step:08d}.tmp-{os.getpid()}"]
    dist.broadcast_object_list(box, src=0)  # one temporary folder, named by rank 0
    tmp = root / str(box[0])
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    payload = {"model": model.state_dict(), "optim": _optimizer_tensors(model, optimizer)}
    dcp.save(payload, storage_writer=FileSystemWriter(tmp, sync_files=True))  # .metadata last, by rank 0
    if rank == 0:
        whole = optimizer.state_dict()  # counters and seeds: the same on every rank, rank 0's are saved
        names = [name for name, _ in _ordered(model, optimizer)]
        plain = {
            names[i]: {k: v for k, v in state.items() if not _sharded_tensor(v)} for i, state in whole["state"].items()
        }
        optim = {"param_groups": whole["param_groups"], "extra": whole.get("gradproj", {}), "plain_state": plain}
        state = {"trainer": trainer_state, "rng": rng_states(), "optimizer": optim}
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
        torch.save(state, tmp / "trainer.pt")
        info = {"step": step, "format": FORMAT, "world_size": dist.get_world_size(), "shards": _shards(model)}
        info.update(meta or {})
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, default=str))
        for name in FILES[1:]:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        commit(tmp, final)
        for stale in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata records, ``torch.Size``, dtypes and builtin containers: nothing that runs code."""

    SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed.checkpoint")
    #: plain records DCP's metadata is made of, besides its own classes: (module, name)
    SAFE = frozenset(
        {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool")}
        | {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout")}
        | {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):  # how some Pythons pickle an enum member
            return _enum_member
        if (module, name) in self.SAFE or module.startswith(self.SAFE_MODULES):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata record")


def _enum_member(cls: Any, name: str) -> Any:
    """``getattr`` for the one use DCP's metadata makes of it: a member of one of DCP's enums."""
    if (
        isinstance(cls, type)
        and issubclass(cls, enum.Enum)
        and cls.__module__.startswith("torch.distributed.checkpoint")
    ):
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not a DCP enum member")


def _safe_reader(path: Path) -> Any:
    """DCP's file reader whose ``.metadata`` goes through :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            raw = (Path(self.path) / ".metadata").read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """One step on small seeded random gradients, so the state holds every key with its placement
    (DCP loads into existing tensors); a checkpoint's values then replace all of it, weights included."""
    from torch.distributed.tensor import DTensor

    from ..optim.placement import is_sharded

    generator = torch.Generator().manual_seed(0)
    for group in optimizer.param_groups:
        for p in group["params"]:
            shard = p.to_local() if is_sharded(p) else p
            noise = (1e-3 * torch.randn(shard.shape, generator=generator)).to(shard)
            p.grad = (
                DTensor.from_local(
                    noise, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
                if is_sharded(p)
                else noise
            )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def load_sharded_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore a sharded checkpoint into this rank's shards (any number of ranks: DCP re-shards);
    return the saved trainer state. A collective: every rank calls it."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing {', '.join(missing)}")
    try:
        saved = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: trainer.pt does not load ({error_reason(error)})") from None
    if not optimizer.state:
        prime_optimizer_state(optimizer)
    target = {"model": model.state_dict(), "optim": _optimizer_tensors(model, optimizer)}
    meta = read_meta(path)
    saved_shards = int(meta.get("shards", meta.get("world_size", 1)))
    moved = _eight_bit_moments(target["optim"]) if saved_shards != _shards(model) else {}
    try:
        if moved:  # read them whole, in the layout they were written in (see requantize)
            _read_whole(path, target["optim"], moved)
        dcp.load(target, storage_reader=_safe_reader(path))
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path}: its shards do not fit this model and optimizer ({error_reason(error)})"
        ) from None
    for base, (codes, absmax) in moved.items():
        requantize(target["optim"], base, codes, absmax, saved_shards)
    optim, tensors = saved["optimizer"], target["optim"]
    state = {}
    for i, (name, p) in enumerate(_ordered(model, optimizer)):
        keys = [k for k, v in optimizer.state[p].items() if _sharded_tensor(v)]
        state[i] = {**optim["plain_state"].get(name, {}), **{k: tensors[f"{name}.{k}"] for k in keys}}
    optimizer.load_state_dict({"state": state, "param_groups": optim["param_groups"], "gradproj": optim["extra"]})
    model.load_state_dict(target["model"])
    if scheduler is not None and saved["scheduler"]:
        scheduler.load_state_dict(saved["scheduler"])
    set_rng_states(saved["rng"])
    trainer_state: dict[str, Any] = saved["trainer"]
    return trainer_state


def _shards(model: nn.Module) -> int:
    """How many ranks split each row range (the mesh's shard dimension; 1 for a plain model)."""
    from ..optim.placement import is_sharded, shard_group

    for p in model.parameters():
        if is_sharded(p):
            return dist.get_world_size(shard_group(p))
    return 1


def _eight_bit_moments(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``"<parameter>.<moment>"`` -> this rank's (codes, absmax) of every 8-bit moment in ``state``."""
    bases = [key.removesuffix("_absmax") for key in state if key.endswith("_absmax")]
    return {base: (state[f"{base}_codes"], state[f"{base}_absmax"]) for base in bases}


def _read_whole(path: Path, state: dict[str, Tensor], moved: dict[str, Any]) -> None:
    """Point ``state``'s entries of the ``moved`` moments at plain tensors of the saved shapes: DCP then
    reads them whole on every rank (the absmax's saved shape depends on the world that wrote it)."""
    metadata = _safe_reader(path).read_metadata().state_dict_metadata
    for base in moved:
        for key in (f"{base}_codes", f"{base}_absmax"):
            saved = metadata[f"optim.{key}"]
            state[key] = torch.empty(tuple(saved.size), dtype=saved.properties.dtype)


def requantize(state: dict[str, Tensor], base: str, codes: Tensor, absmax: Tensor, saved_shards: int) -> None:
    """8-bit moments written by ``saved_shards`` ranks, for this rank's rows on another split.

    Each writer quantized its own rows in 256-element blocks (:mod:`gradproj.rules.quant`), so the
    whole codes and the concatenated absmax are dequantized writer by writer, this rank's rows cut out
    and quantized again in its own blocks (one more rounding, at the 8-bit error; a same-size resume
    loads the codes as they are and stays bit-exact). ``codes``/``absmax`` are this rank's tensors,
    filled in place; ``state`` gets them back in place of the whole ones."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from ..optim.placement import local, row_chunk
    from ..rules import quant, quantized_keys

    signed = quantized_keys()[base.rsplit(".", 1)[1]]
    whole_codes, whole_absmax = state[f"{base}_codes"], state[f"{base}_absmax"]
    rows, per_row = whole_codes.shape[0], math.prod(whole_codes.shape[1:])
    parts, start = [], 0
    for writer in range(saved_shards):
        block = whole_codes[row_chunk(rows, writer, saved_shards)]
        count = quant.absmax_numel(block.numel())
        if block.numel():
            parts.append(quant.dequantize(block, whole_absmax[start : start + count], signed=signed))
        start += count
    moment = torch.cat(parts) if parts else torch.zeros(whole_codes.shape)  # rows x ...
    shape, offset = compute_local_shape_and_global_offset(codes.shape, codes.device_mesh, codes.placements)  # type: ignore[attr-defined]
    mine = moment[offset[0] : offset[0] + shape[0]]
    if mine.numel() and per_row:
        new_codes, new_absmax = quant.quantize(mine, signed=signed)
        local(codes).copy_(new_codes)
        local(absmax).copy_(new_absmax)
    state[f"{base}_codes"], state[f"{base}_absmax"] = codes, absmax


def consolidated_weights(path: Path) -> dict[str, Tensor]:
    """The whole weights of a sharded checkpoint, read by one process (no process group, each shard
    read once): what an export to one Hugging Face folder or a safetensors file needs.

    The names are the model's parameter and buffer names (``model.`` dropped), the tensors plain."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _safe_reader(Path(path))
    try:
        metadata = reader.read_metadata()
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: unreadable DCP metadata ({error_reason(error)})") from None
    target = {
        key: torch.empty(tuple(info.size), dtype=info.properties.dtype)
        for key, info in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(info, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=_safe_reader(Path(path)), no_dist=True)
    return {key.removeprefix("model."): value for key, value in target.items()}
