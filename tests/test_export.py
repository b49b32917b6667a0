"""After training: every run's final model is a Hugging Face folder that transformers loads offline
in another process (logits and tokenization equal to the trainer's), ``gradproj generate`` continues
a prompt from it, ``gradproj export`` writes the same folder from any checkpoint, and bad input is
one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gradproj.cli import main
from gradproj.train import PretrainConfig, pretrain
from gradproj.train.text import prepare_pretrain_data

TINY = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=1024, progress=False, tensorboard=False)
PROMPT = "ROMEO: What light through yonder window"

#: run in a fresh interpreter, offline: what a user of the exported folder gets from transformers alone
LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
json.dump({"ids": ids[0].tolist(), "logits": logits[0].tolist(), "dtype": str(model.dtype),
           "generated": greedy[0, ids.shape[1]:].tolist(), "class": type(model).__name__}, sys.stdout)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = prepare_pretrain_data(None, None, 4096, 32)
    out = tmp_path_factory.mktemp("export") / "run"
    result = pretrain(PretrainConfig(**TINY, steps=8, out=str(out)), data=data)  # type: ignore[arg-type]
    return result, data


def _load_elsewhere(folder: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder), PROMPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_the_final_model_loads_in_another_process_with_the_trainers_logits(run: Any) -> None:
    result, data = run
    folder = Path(result.summary["model_dir"])
    assert folder == result.run_dir / "model"
    loaded = _load_elsewhere(folder)
    assert loaded["class"] == "LlamaForCausalLM" and loaded["dtype"] == "torch.float32"
    assert loaded["ids"] == data.tokenizer.backend.encode(PROMPT).ids  # the trainer's own tokenization
    model = result.model.eval()
    ids = torch.tensor([loaded["ids"]])
    with torch.no_grad():
        expected = model(ids).logits[0]
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=None)
    assert torch.equal(torch.tensor(loaded["logits"]), expected)  # the same weights, the same code: the same bits
    assert loaded["generated"] == greedy[0, ids.shape[1] :].tolist()


def test_generate_continues_a_prompt_seeded_and_greedy(run: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result, _ = run
    texts = []
    for argv in (["--seed", "1"], ["--seed", "1"], ["--seed", "2"], ["--greedy"]):
        assert main(["generate", str(result.run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12", *argv]) == 0
        texts.append(capsys.readouterr().out)
    assert all(t.startswith("ROMEO:") and len(t) > len("ROMEO:\n") for t in texts)
    assert texts[0] == texts[1]  # the same seed, the same text
    assert texts[0] != texts[2]  # another seed samples another (12 tokens of an 8-step model's spread)


def test_export_writes_the_final_folder_from_a_checkpoint(run: Any, tmp_path: Path) -> None:
    result, _ = run
    out = tmp_path / "hf"
    assert main(["export", str(result.run_dir), "--out", str(out)]) == 0  # its newest checkpoint: the final one
    exported, final = load_file(out / "model.safetensors"), load_file(result.run_dir / "model" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_text() == (result.run_dir / "model" / name).read_text(), name


def test_init_from_an_exported_model_continues_from_its_weights(run: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from gradproj.train.pretrain import PretrainTask, next_token_loss

    result, data = run
    options = {k: v for k, v in TINY.items() if k != "model"}  # the architecture is the weights' own
    config = PretrainConfig(**options, init_from=str(result.run_dir), steps=1, out=str(tmp_path / "more"))  # type: ignore[arg-type]
    task = PretrainTask(config)
    assert torch.equal(task.data.train.ids, data.train.ids)  # the exported tokenizer gives the run's own tokens
    continued = pretrain(config)
    exported = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    with torch.no_grad():
        first = float(next_token_loss(exported, task.batch(0, config.batch_size)["tokens"]))
    assert continued.losses[0] == pytest.approx(first, rel=1e-6)  # step 1 ran on the exported weights
    assert continued.summary["model_name"] == str(result.run_dir)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "{empty}", "--prompt", "x"], "neither a model folder"),
        (["generate", "{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["generate", "{run}", "--prompt", "x", "--temperature", "0"], "--temperature 0.0: must be above 0"),
        (["generate", "{weightless}", "--prompt", "x"], "could not load a causal LM"),
        (["pretrain", "--init-from", "{weightless}", "--steps", "1"], "could not load a causal LM"),
        (["pretrain", "--init-from", "{empty}", "--steps", "1"], "neither a model folder"),
        (["pretrain", "--init-from", "{run}", "--model", "llama-1m", "--steps", "1"], "is not a --model llama-1m"),
    ],
)
def test_bad_input_is_one_line(
    run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    result, _ = run
    (tmp_path / "empty").mkdir()
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # a model folder without its weights
        (weightless / name).write_bytes((result.run_dir / "model" / name).read_bytes())
    paths = {"empty": tmp_path / "empty", "run": result.run_dir, "weightless": weightless}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
