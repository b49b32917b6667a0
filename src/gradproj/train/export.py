"""A trained model as one Hugging Face folder: ``config.json``, ``model.safetensors`` in the dtype
trained, the tokenizer's files and (for a causal LM) ``generation_config.json``, so that
``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load it
offline. Every run writes one at its end (``RUN/model``, named in the summary); ``gradproj export``
writes one from any checkpoint, of either format: one-process (safetensors) or sharded (DCP, any
number of ranks). One process reads each shard once into a model built on the meta device, so the
weights exist once.

Example::

    gradproj export runs/pretrain-galore_adamw-20261202/ --out my-model
    >>> AutoModelForCausalLM.from_pretrained("my-model")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..folders import MODEL_DIR, TOKENIZER_DIR, check_model_destination, error_reason, model_folder
from .checkpoint import CheckpointError, commit, read_meta, resolve_checkpoint

__all__ = ["MODEL_DIR", "SAMPLING", "TOKENIZER_DIR", "check_model_destination", "export_checkpoint", "model_folder",
           "write_model_folder"]  # fmt: skip

#: how ``gradproj generate`` samples unless told otherwise (saved as the model's generation config)
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 64}


def write_model_folder(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """``model`` (a transformers model) and ``tokenizer`` as a Hugging Face folder at ``out``, written to
    a temporary folder and renamed into place (an interrupted export leaves the previous one whole). Low-rank
    components fine-tuned as factors (``--welore``) are merged into their dense weights first, in place.
    ``out`` must be new, empty or a model folder (:func:`check_model_destination`)."""
    from ..welore import merge

    check_model_destination(Path(out))

    merge(model)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config: Any = getattr(model, "config")  # noqa: B009  (a transformers model's)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # our BPE has no special tokens: none
        setattr(config, key, getattr(tokenizer, key, None))
    config.dtype = next(model.parameters()).dtype  # from_pretrained's dtype="auto" reads it
    from .models import quiet_transformers

    with quiet_transformers():  # "Writing model shards" for one file
        model.save_pretrained(str(tmp))  # type: ignore[operator]
    tokenizer.save_pretrained(str(tmp))
    if getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        generation = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        for key, value in SAMPLING.items():
            setattr(generation, key, value)
        generation.save_pretrained(str(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    commit(tmp, out)
    return out


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write ``checkpoint`` (a checkpoint folder, or a run folder: its newest) to ``out``; returns the
    checkpoint exported."""
    check_model_destination(Path(out))  # before the weights are read
    path = resolve_checkpoint(Path(checkpoint), what="export")
    meta = read_meta(path)
    model = _skeleton(path, meta)
    try:
        model.load_state_dict(_weights(path, meta), assign=True, strict=False)  # the meta skeleton takes them
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model ({error_reason(error)})") from None
    getattr(model, "tie_weights", lambda: None)()  # a tied head was saved once, as the embeddings
    missing = [name for name, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: no weights for {', '.join(missing[:3])} (another model?)")
    write_model_folder(model, checkpoint_tokenizer(path, meta), Path(out))
    return path


def _skeleton(path: Path, meta: dict[str, Any]) -> nn.Module:
    """The checkpoint's model on the meta device: no memory, only the config and the module tree."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .models import build_causal_lm

    config, task = meta.get("config", {}), meta.get("task", {})
    with torch.device("meta"):
        if config.get("kind") == "PretrainConfig":
            name = task.get("model") or config["model"]  # the architecture the run resolved (--init-from's)
            model = build_causal_lm(name, vocab_size=task["vocab_size"], seq_len=config["seq_len"])
            return _factored(model, config, config.get("init_from"))
        if config.get("kind") == "FinetuneConfig" and config.get("task") == "causal-lm":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(task["model_path"]))
            return _factored(model, config, task["model_path"])
        if config.get("kind") == "FinetuneConfig":
            labels = task["labels"]
            hf_config = AutoConfig.from_pretrained(task["model_path"], **label_names(labels))
            return AutoModelForSequenceClassification.from_config(hf_config)  # type: ignore[no-any-return]
    raise CheckpointError(f"checkpoint {path}: a {config.get('kind')} run; export takes pretrain and finetune runs")


def _factored(model: nn.Module, config: dict[str, Any], compressed: str | None) -> nn.Module:
    """A ``--welore`` run's skeleton holds the factors its checkpoints hold, shaped by the compressed model's ranks."""
    if not config.get("welore"):
        return model
    from ..welore import factorize
    from .models import welore_ranks_of

    factorize(model, welore_ranks_of(str(compressed), "the run's compressed model"))
    return model


def label_names(labels: list[str]) -> dict[str, Any]:
    """A classifier's ``num_labels``, ``id2label`` and ``label2id`` for its config."""
    names = dict(enumerate(labels))
    return {"num_labels": len(labels), "id2label": names, "label2id": {n: i for i, n in names.items()}}


def checkpoint_tokenizer(path: Path, meta: dict[str, Any]) -> Any:
    """The run's tokenizer: saved next to its checkpoints (``RUN/tokenizer``), else rebuilt from the
    run's config (a fine-tune's model path; a pre-training's data, whose BPE is cached)."""
    from transformers import AutoTokenizer

    saved = path.parent.parent / TOKENIZER_DIR
    if saved.is_dir():
        return AutoTokenizer.from_pretrained(str(saved))
    config, task = meta.get("config", {}), meta.get("task", {})
    if config.get("kind") == "FinetuneConfig":
        return AutoTokenizer.from_pretrained(task["model_path"])
    from .text import Tokenizer, load_text

    docs = load_text(config.get("data")).train
    return Tokenizer.build(config.get("tokenizer"), docs, int(config["vocab_size"])).as_transformers()


def _weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    if meta.get("format") == "dcp":
        from .sharded_checkpoint import consolidated_weights

        return consolidated_weights(path)
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model folder",
        description="Export a checkpoint (one-process or sharded --fsdp, any number of ranks) to a folder that "
        "transformers loads offline: AutoModelForCausalLM (pretrain runs) or AutoModelForSequenceClassification "
        "(finetune runs), and AutoTokenizer. Every run already writes its final model to RUN/model.",
    )
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoints/step-XXXXXXXX folder")
    p.add_argument(
        "--out", required=True, help="the folder to write (a new one, or an earlier export's, which is replaced)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        path = export_checkpoint(Path(args.checkpoint), Path(args.out))
    except (CheckpointError, ValueError) as error:
        print(f"gradproj export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out}")
    return 0
