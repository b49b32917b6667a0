"""The folders a user names: a model to load (a run, a model folder or a Hugging Face name) and where a model
may be written; the one-line reason of an underlying error. Below the trainer and the planner (nothing here
imports them), so that the planner, configs, models, checkpoints and exports all read one definition.

Example:
    >>> model_folder("meta-llama/Llama-3.2-1B")  # not a local folder: a Hugging Face name, as given
    'meta-llama/Llama-3.2-1B'
    >>> error_reason(OSError("disk full\\nmore"))
    'OSError: disk full'
"""

from __future__ import annotations

from pathlib import Path

#: the folder of a run that holds its final model (``RUN/model``) and its tokenizer (``RUN/tokenizer``)
MODEL_DIR, TOKENIZER_DIR = "model", "tokenizer"


def error_reason(error: Exception) -> str:
    """The first line of an underlying error: enough to say why, short enough for one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def model_folder(name: str) -> str:
    """``name`` as a model to load: a run folder means its exported final model (``RUN/model``); a
    folder must hold a ``config.json``; anything else is a Hugging Face name."""
    path = Path(name).expanduser()
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise ValueError(f"{name}: no such folder (give a run folder, a model folder or a Hugging Face name)")
    if (path / MODEL_DIR / "config.json").is_file():
        return str(path / MODEL_DIR)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{name}: neither a model folder (no config.json) nor a run folder with {MODEL_DIR}/")
    return name


#: what marks a folder as a run's (or anything but a model's): an export never replaces such a folder
RUN_MARKS = ("metrics.jsonl", "summary.json", "checkpoints", "meta.json")


def check_model_destination(out: Path, flag: str = "--out") -> None:
    """``out`` may receive a model folder: it does not exist, is empty, or is a model folder itself (a
    ``config.json`` and weights), which an export replaces whole. A file, a run folder or any other folder
    with content is refused, naming what is in it: replacing it would destroy what the user keeps there.

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp()); _ = (run / "metrics.jsonl").write_text("{}")
    >>> check_model_destination(run)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --out ...: a folder that is not a model folder (it holds metrics.jsonl); ...
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{flag} {out}: a file is there; give the folder to write the model to")
    names = sorted(p.name for p in out.iterdir())
    weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    if not names or ("config.json" in names and weights and not set(names) & set(RUN_MARKS)):
        return
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise ValueError(
        f"{flag} {out}: a folder that is not a model folder (it holds {shown}); an export replaces its destination "
        "whole, so give a new folder (or an earlier export's)"
    )
