"""Checkpoints that survive a crash: model weights (safetensors), optimizer, scheduler, data
position, RNG states and config in one folder, written under a temporary name and renamed into
place, so a kill at any moment leaves the previous checkpoint whole.

Nothing here unpickles code: weights load with safetensors and everything else with
``torch.load(weights_only=True)``.

Example:
    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> run = Path(tempfile.mkdtemp())
    >>> path = save_checkpoint(run, 5, model, opt, None, {"position": 10}, keep=2)
    >>> latest_checkpoint(run) == path, load_checkpoint(path, model, opt, None)["position"]
    (True, 10)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..folders import error_reason
from .run_config import TrainConfig, upgrade

PATTERN = re.compile(r"^step-(\d{8})$")
FILES = ("model.safetensors", "optimizer.pt", "trainer.pt", "meta.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the run resuming from it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
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
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` atomically and keep the newest ``keep``."""
    from safetensors.torch import save_model

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"trainer": trainer_state, "rng": rng_states()}
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    torch.save(state, tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2, default=str))
    for name in FILES:
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    commit(tmp, final)
    for stale in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished checkpoint folder into place: the commit point, before which the old
    checkpoints are untouched (re-saving a step after a resume moves the old one aside first)."""
    _default_modes(tmp)
    if final.exists():
        old = final.parent / f"{tmp.name}.old"
        _remove(old)  # what an interrupted commit left
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def _remove(path: Path) -> None:
    """Delete a folder or a file, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _default_modes(folder: Path) -> None:
    """Give the folder's files the mode a new file gets under the process' umask (0644 usually): safetensors
    writes through a private temporary file (0600), which would leave the weights unreadable to the group
    that reads the rest of the run."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if PATTERN.match(p.name) and p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: Path, what: str = "--resume") -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint); ``what`` names it in the error."""
    path = Path(path)
    if PATTERN.match(path.name) and path.is_dir():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{what} {path}: no checkpoint found (expected {path}/checkpoints/step-XXXXXXXX)")
    return found


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable meta.json ({error})") from None
    return meta


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG in place; return the saved trainer state."""
    from safetensors.torch import load_model

    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing {', '.join(missing)}")
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: model weights do not load ({error_reason(error)})") from None
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        state = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(optimizer_state)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not load ({error_reason(error)})") from None
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    trainer_state: dict[str, Any] = state["trainer"]
    return trainer_state


def resume_config(cls: type[TrainConfig], resume: Path, given: dict[str, Any]) -> TrainConfig:
    """The one resume path: the saved settings of the run at ``resume``, overlaid with ``given``
    (the flags a user gave, or a whole config), refused if ``given`` changes a setting that a resumed
    run may not change (only steps, evaluation/save/log intervals and outputs may)."""
    meta = read_meta(resolve_checkpoint(resume))
    saved = meta.get("config", {})
    if saved.get("kind") not in (None, cls.__name__):
        raise CheckpointError(f"--resume {resume}: a {saved['kind']} run cannot be resumed as a {cls.__name__}")
    base = {k: v for k, v in upgrade(saved).items() if k not in ("kind", "out")}
    given = {k: v for k, v in given.items() if not (v is None and k in cls.RESOLVED_AT_START)}
    config = cls.from_dict(_overlay(base, given))
    changed = config.changed_on_resume(saved, {"optim.rank": meta.get("resolved_rank")})
    if changed:
        raise CheckpointError(
            f"--resume {resume}: the run's settings differ from the checkpoint's ({'; '.join(changed)}); "
            "resume with the original settings (only steps, eval/save/log intervals and outputs may change)"
        )
    return config


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s values, nested dicts merged key by key."""
    out = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _overlay(out[key], value) if nested else value
    return out
