"""`gradproj pretrain/finetune` from the command line: bad input gets one clear line and exit 2;
text sources split without overlap; the Hugging Face Trainer runs and resumes a gradproj optimizer."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from gradproj.cli import main
from gradproj.train.text import load_text

TINY = ["--model", "llama-tiny", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--no-tensorboard"]


def _error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(["pretrain", *TINY, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback
    return lines[0]


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "story.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(60)))
    return path


def test_bad_input_is_one_line_naming_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text_file: Path
) -> None:
    missing = tmp_path / "nope.txt"
    assert f"--data {missing}: no such file" in _error(capsys, ["--data", str(missing)])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert "0 document(s) of text; need at least 2" in _error(capsys, ["--data", str(empty)])
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert "looks binary" in _error(capsys, ["--data", str(binary)])
    assert "unknown model 'llama-3m'; valid: llama-tiny" in _error(
        capsys, ["--data", str(text_file), "--model", "llama-3m"]
    )
    message = _error(capsys, ["--data", str(text_file), "--rank", "500"])
    assert "--rank 500 is larger than the model's matrices" in message and "use --rank <= 64" in message
    assert "steps=0 is not valid" in _error(capsys, ["--data", str(text_file), "--steps", "0"])
    assert "no checkpoint found" in _error(capsys, ["--resume", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # argparse: the choices are listed
        main(["pretrain", "--optimizer", "adam"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'adam'" in capsys.readouterr().err


def test_resume_with_changed_model_flag_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text_file: Path
) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(text_file), "--steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    message = _error(capsys, ["--resume", str(run), "--model", "llama-1m"])
    assert "model: 'llama-tiny' -> 'llama-1m'" in message
    (run / "checkpoints/step-00000002/optimizer.pt").write_bytes(b"not a checkpoint")
    assert "optimizer state does not load" in _error(capsys, ["--resume", str(run), "--steps", "3"])


def test_local_text_sources_hold_out_without_overlap(tmp_path: Path, text_file: Path) -> None:
    single = load_text(str(text_file))
    assert len(single.validation) == 3 and not set(single.train) & set(single.validation)
    assert single.validation[-1].startswith("Paragraph 59")  # the end of the file is held out
    folder = tmp_path / "books"
    for i in range(30):
        (folder / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 3}" / f"book{i}.txt").write_text(f"Book {i} first.\n\nBook {i} second.")
    (folder / "image.png").write_bytes(b"\x89PNG")  # ignored: not a text suffix
    split = load_text(str(folder))
    held = {d.split()[1] for d in split.validation}
    assert held and not held & {d.split()[1] for d in split.train}  # whole books held out
    assert len(split.train) + len(split.validation) == 60


def test_hugging_face_dataset_source_streams_train_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name, config, split, streaming):  # type: ignore[no-untyped-def]
        calls.append((name, config, split, streaming))
        return iter([{"text": f"{split} document {i}"} for i in range(1000)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    split = load_text("hf:allenai/c4:en", max_hub_docs=40)
    assert calls == [("allenai/c4", "en", "train", True), ("allenai/c4", "en", "validation", True)]
    assert len(split.train) == 40 and len(split.validation) == 2 and split.validation[0].startswith("validation")


def test_hf_trainer_runs_and_resumes_a_gradproj_optimizer(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from gradproj import GaLoreAdamW
    from gradproj.integrations.hf import create_optimizer
    from gradproj.train.models import build_causal_lm

    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (48, 17)).tolist()]

    def train(out: Path, resume: str | None = None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_causal_lm("llama-tiny", vocab_size=128, seq_len=16)
        args = TrainingArguments(
            str(out),
            max_steps=8,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            save_steps=4,
            optim_target_modules=["self_attn", "mlp"],
            optim_args="rank=8,update_proj_gap=3,scale=0.25",
            report_to=[],
            use_cpu=True,
            seed=0,
            data_seed=0,
            logging_steps=100,
            disable_tqdm=True,
        )
        optimizer, scheduler = create_optimizer(model, args, optimizer="galore_adamw")
        assert isinstance(optimizer, GaLoreAdamW) and optimizer.param_groups[0]["rank"] == 8
        Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, scheduler)).train(
            resume_from_checkpoint=resume
        )
        return model

    full = train(tmp_path / "full")
    assert (tmp_path / "full/checkpoint-4/optimizer.pt").exists()
    state = torch.load(tmp_path / "full/checkpoint-4/optimizer.pt", weights_only=True)
    assert any("basis_left" in s or "basis_right" in s for s in state["state"].values())
    resumed = train(tmp_path / "full", resume=str(tmp_path / "full/checkpoint-4"))
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_hugging_face_tokenizer_source(tmp_path: Path, text_file: Path) -> None:
    from gradproj.data.embedded import minilm_path

    run = tmp_path / "run"
    args = ["pretrain", *TINY, "--data", str(text_file), "--tokenizer", str(minilm_path()), "--steps", "2"]
    assert main([*args, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["task"]["vocab_size"] == 30522  # the BERT WordPiece vocabulary, not a trained BPE


class _FakeSplit(list):  # type: ignore[type-arg]
    """Just enough of a datasets.Dataset: rows, a column by name, and the label names."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        super().__init__(rows)
        self.features = {"label": types.SimpleNamespace(names=["not_equivalent", "equivalent"])}

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        return [row[key] for row in self] if isinstance(key, str) else super().__getitem__(key)


def test_glue_pair_task_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name, task, split):  # type: ignore[no-untyped-def]
        assert (name, task) == ("nyu-mll/glue", "mrpc")
        rows = [{"sentence1": f"The cat sat {i}.", "sentence2": f"A cat sat {i}.", "label": i % 2} for i in range(24)]
        return _FakeSplit(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    run = tmp_path / "run"
    flags = ["--task", "mrpc", "--steps", "2", "--batch-size", "4", "--max-length", "16", "--no-progress"]
    assert main(["finetune", *flags, "--no-tensorboard", "--out", str(run)]) == 0
    evaluation = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert evaluation["kind"] == "eval" and 0 <= evaluation["f1"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labels"] == ["not_equivalent", "equivalent"] and summary["heldout_examples"] == 24


def test_any_hugging_face_causal_lm_config(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import Qwen2Config

    Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ).save_pretrained(tmp_path / "qwen")
    run = tmp_path / "run"
    args = ["pretrain", "--model", str(tmp_path / "qwen"), "--data", str(text_file), "--steps", "2", "--seq-len", "16"]
    assert main([*args, "--no-progress", "--no-tensorboard", "--out", str(run), "--rank", "4"]) == 0
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints/step-00000002/model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in weights  # Qwen2's biased projections: not a LLaMA
    assert "not a loadable Hugging Face config" in _error(  # a folder with no config (a run folder has model/)
        capsys, ["--data", str(text_file), "--model", str(tmp_path / "run" / "checkpoints")]
    )


def _fields(cls: type, prefix: str = "") -> dict[str, object]:
    """Every described field of a config (nested ones as ``optim.lr``) and its default."""
    import dataclasses

    out: dict[str, object] = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_fields(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_every_config_field_is_one_flag_with_its_help_and_default(command: str) -> None:
    """The flags are generated from the fields: a field without a flag (or a flag without a field)
    fails here, and each flag's help carries the field's default."""
    import argparse

    from gradproj.cli import build_parser
    from gradproj.train.config import FinetuneConfig, PretrainConfig

    cls = PretrainConfig if command == "pretrain" else FinetuneConfig
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    flags = {a.dest: a for a in parser._actions if a.dest not in ("help", "resume")}
    fields = _fields(cls)
    assert set(flags) == set(fields)
    assert flags["optim.name"].option_strings == ["--optimizer"] and flags["progress"].option_strings == [
        "--no-progress"
    ]
    assert "(default 4096)" in (flags["vocab_size"].help or "") if command == "pretrain" else True
    assert f"(default {fields['steps']})" in (flags["steps"].help or "")  # finetune's own default, 100
    assert "fira_adamw 1" in (flags["optim.scale"].help or "")  # drawn from the registry


@pytest.mark.parametrize("command", ["pretrain", "finetune", "memory", "export", "generate", "compress", "report"])
def test_a_commands_help_names_only_flags_it_has(command: str) -> None:
    """Help text drawn from shared fields must not send a reader to a flag the command lacks (pretrain's
    --welore help once named finetune's --task)."""
    import argparse
    import re

    from gradproj.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    own = {flag for action in parser._actions for flag in action.option_strings}
    if command == "memory":  # it plans a pretrain run, whose fields' help speaks of the trainer's flags
        own |= {flag for action in sub.choices["pretrain"]._actions for flag in action.option_strings}
    texts = [parser.description or "", *(a.help or "" for a in parser._actions)]
    texts += [line for line in (parser.epilog or "").splitlines() if "torchrun" not in line]  # torchrun's own
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", "\n".join(texts)))
    # flags of other commands that a help may name as where to go next
    elsewhere = {"--init-from", "--welore", "--data", "--update-proj-gap", "--rank", "--fsdp", "--max-nonfinite"}
    assert named - own - elsewhere == set(), named - own


def test_flags_build_the_config_the_fields_describe(tmp_path: Path) -> None:
    from gradproj.cli import build_parser
    from gradproj.optim.build import OptimizerSpec
    from gradproj.train.cli import build_config
    from gradproj.train.config import PretrainConfig

    optimizer = ["--optimizer", "fira_adamw", "--lr", "3e-3", "--rank", "8", "--projector", "rsvd"]
    loop = ["--steps", "7", "--layerwise", "--no-checkpoints", "--seq-len", "16", "--min-lr-ratio", "0.2"]
    args = build_parser().parse_args(["pretrain", *optimizer, *loop])
    config, resume = build_config(args)
    optim = OptimizerSpec(name="fira_adamw", lr=3e-3, rank=8, projector="rsvd")
    expected = PretrainConfig(optim=optim, steps=7, layerwise=True, checkpoints=False, seq_len=16, min_lr_ratio=0.2)
    assert config == expected and resume is None
    assert PretrainConfig.from_dict(config.to_dict()) == config  # config.json round-trips


def test_one_resume_path_for_flags_and_the_python_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text_file: Path
) -> None:
    import dataclasses

    from gradproj.train import CheckpointError, PretrainConfig, pretrain

    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(text_file), "--steps", "2", "--rank", "4", "--out", str(run)]) == 0
    capsys.readouterr()
    # a changed optimizer option is named the same way from the CLI and from Python
    assert "optim.rank: 4 -> 8" in _error(capsys, ["--data", str(text_file), "--resume", str(run), "--rank", "8"])
    saved = PretrainConfig.from_dict(json.loads((run / "checkpoints/step-00000002/meta.json").read_text())["config"])
    changed = dataclasses.replace(saved, optim=dataclasses.replace(saved.optim, rank=8))
    with pytest.raises(CheckpointError, match=r"optim\.rank: 4 -> 8"):
        pretrain(changed, resume=run)
    # a run saved before the optimizer was nested (flat keys) still resumes
    meta_path = run / "checkpoints/step-00000002/meta.json"
    meta = json.loads(meta_path.read_text())
    optim = meta["config"].pop("optim")
    meta["config"].update({k: v for k, v in optim.items() if k != "name"}, optimizer=optim["name"])
    meta_path.write_text(json.dumps(meta))
    assert main(["pretrain", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
