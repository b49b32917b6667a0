"""Causal-LM fine-tuning (``gradproj finetune --task causal-lm``): JSONL parsing with line numbers,
the loss on response tokens only, batched greedy answers equal to one-by-one ones, GaLore and AdamW
runs that learn and resume bit-exact, and bad input in one line."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gradproj.cli import main
from gradproj.optim.build import OptimizerSpec
from gradproj.train import FinetuneConfig, PretrainConfig, pretrain
from gradproj.train.finetune import finetune
from gradproj.train.sft import CausalLMTask, generate_answers
from gradproj.train.sft_data import IGNORE, Pair, parse_jsonl, tokenize_pairs

COLOURS = ["red", "red", "red", "blue"]  # item 3 is blue: a model that learned the format scores above 0


def _lines() -> list[str]:
    """Short-answer pairs: an item's colour follows from its number mod 4 (the prompt's last word)."""
    rows = [{"prompt": f"The colour of item {i % 4} is", "response": f" {COLOURS[i % 4]}"} for i in range(60)]
    rows += [
        {
            "messages": [
                {"role": "user", "content": f"Colour {i % 4}?"},
                {"role": "assistant", "content": COLOURS[i % 4]},
            ]
        }
        for i in range(20)
    ]
    return [json.dumps(r) for r in rows]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama-tiny that gradproj pre-trained (the only kind of causal LM with weights offline)."""
    out = tmp_path_factory.mktemp("sft") / "base"
    tiny = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=512, progress=False, tensorboard=False)
    pretrain(PretrainConfig(**tiny, steps=8, out=str(out)))  # type: ignore[arg-type]
    (out.parent / "colours.jsonl").write_text("\n".join(_lines()) + "\n")
    return out


def _config(base: Path, **options: Any) -> FinetuneConfig:
    settings: dict[str, Any] = dict(
        task="causal-lm", model=str(base), data=str(base.parent / "colours.jsonl"), max_length=24, batch_size=8,
        steps=6, eval_every=0, save_every=3, progress=False, tensorboard=False,
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **options})


def test_jsonl_pairs_and_messages_with_line_numbers() -> None:
    pairs = parse_jsonl(_lines()[58:62], source="x.jsonl")
    assert pairs[0] == Pair("The colour of item 2 is", " red") and pairs[1].response == " blue"
    assert pairs[2] == Pair("user: Colour 0?\nassistant:", "red")  # no chat template: role lines
    template = parse_jsonl(_lines()[60:61], source="x", chat_template=lambda m: f"<{m[0]['content']}>")
    assert template[0].prompt == "<Colour 0?>"
    for lines, message in (
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], "line 2 has neither"),
        (["", "not json"], "line 2 is not JSON"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1 has neither"),
        (["", "  "], "no examples (an empty file)"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_jsonl(lines, source="x.jsonl")


def test_the_loss_is_on_the_response_and_a_long_prompt_keeps_its_end(base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base / "model")  # our BPE: no EOS, so a blank line ends a response
    long = Pair("one two three four five six seven eight nine ten eleven twelve Category:", " sport")
    examples = tokenize_pairs(tokenizer, [Pair("Q:", " yes"), long], max_length=10)
    end = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" yes", add_special_tokens=False)["input_ids"] + end
    first = examples.labels[0][examples.labels[0] != IGNORE].tolist()
    assert first == answer and examples.prompt(0) == tokenizer("Q:", add_special_tokens=False)["input_ids"]
    kept = tokenizer.decode(examples.prompt(1))
    assert kept.endswith("Category:") and not kept.startswith("one")  # the start was cut, the instruction kept
    assert int(examples.attention_mask[1].sum()) == 10 and examples.labels[1, -1] != IGNORE


def test_batched_greedy_answers_equal_one_by_one(base: Path) -> None:
    task = CausalLMTask(_config(base))
    model = task.build_model().eval()
    prompts = [task.train.prompt(i) for i in range(0, len(task.train), 6)]  # prompts of several lengths
    assert len({len(p) for p in prompts}) > 1
    batched = generate_answers(model, task.tokenizer, prompts, 4)
    alone = [generate_answers(model, task.tokenizer, [p], 4)[0] for p in prompts]
    assert batched == alone  # left padding changes nothing: positions follow the attention mask


def _exact_match_one_by_one(model: Any, task: CausalLMTask) -> float:
    """The metric by hand: transformers' greedy generate on each unpadded prompt, cut at the blank line."""
    right = 0
    for i, pair in enumerate(task.held_out.pairs):
        ids = torch.tensor([task.held_out.prompt(i)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=task.answer_tokens, do_sample=False, pad_token_id=0)
        right += task.tokenizer.decode(out[0, ids.shape[1] :]).split("\n\n")[0].strip() == pair.response.strip()
    return right / len(task.held_out)


@pytest.mark.parametrize("optimizer", ["galore_adamw", "adamw"])
def test_sft_learns_and_resumes_bit_exact(base: Path, tmp_path: Path, optimizer: str) -> None:
    optim = OptimizerSpec(name=optimizer, rank=8, update_proj_gap=4, lr=1e-2, other_lr=1e-2)
    cfg = _config(base, optim=optim, steps=24, save_every=12)
    before = CausalLMTask(cfg).evaluate(CausalLMTask(cfg).build_model().eval())
    full = finetune(replace(cfg, out=str(tmp_path / "full")))
    assert full.final_eval["loss"] < before["loss"]  # the responses became likelier
    task = CausalLMTask(cfg)
    assert 0 < full.final_eval["exact_match"] == _exact_match_one_by_one(full.model.eval(), task)
    answers = [p.response.strip() for p in task.held_out.pairs]
    assert full.summary["majority_share"] == max(map(answers.count, answers)) / len(answers)
    step = tmp_path / "full/checkpoints/step-00000012"
    shutil.copytree(step, tmp_path / "part/checkpoints" / step.name)
    resumed = finetune(replace(cfg, out=str(tmp_path / "part")), resume=tmp_path / "part")
    assert resumed.losses == full.losses[12:]
    a = load_file(tmp_path / "full/checkpoints/step-00000024/model.safetensors")
    b = load_file(tmp_path / "part/checkpoints/step-00000024/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full/model/generation_config.json").is_file()  # exported as a causal LM


def test_layerwise_and_accumulation_step_as_the_standard_run(base: Path, tmp_path: Path) -> None:
    optim = OptimizerSpec(name="galore_adamw", rank=8, update_proj_gap=4, lr=1e-2, other_lr=1e-2)
    cfg = _config(base, optim=optim, steps=6, checkpoints=False, clip=0.0)  # layer-wise clips by the last norm
    standard = finetune(replace(cfg, out=str(tmp_path / "standard")))
    layerwise = finetune(replace(cfg, layerwise=True, out=str(tmp_path / "layerwise")))
    assert layerwise.losses == pytest.approx(standard.losses, rel=1e-5)  # stepped inside backward, same maths
    # responses of one token each (" red", " green") and the blank line: every example has as many response
    # tokens, so the mean of two micro-batches' means is the batch's mean
    even = tmp_path / "even.jsonl"
    even.write_text(
        "".join(
            json.dumps({"prompt": f"Item {i % 4}:", "response": [" red", " green"][i % 4 == 3]}) + "\n"
            for i in range(60)
        )
    )
    cfg = replace(cfg, data=str(even))
    standard = finetune(replace(cfg, out=str(tmp_path / "even-standard")))
    accumulated = finetune(replace(cfg, batch_size=4, grad_accum=2, out=str(tmp_path / "accumulated")))
    assert accumulated.summary["global_batch"] == 8
    assert accumulated.losses == pytest.approx(standard.losses, rel=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "causal-lm"], "--task causal-lm needs --model"),
        (["--task", "causal-lm", "--model", "{base}", "--data", "{bad}"], "line 2 has neither"),
        (["--task", "causal-lm", "--model", "{base}", "--data", "{empty}"], "no examples (an empty file)"),
        (["--task", "causal-lm", "--model", "{base}/checkpoints", "--data", "{empty}"], "neither a model folder"),
        (["--data", "{bad}"], "only --task causal-lm reads a data file"),
    ],
)
def test_bad_input_is_one_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"question": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    paths = {"base": base, "bad": tmp_path / "bad.jsonl", "empty": tmp_path / "empty.jsonl"}
    argv = [a.format(**paths) for a in argv]
    assert main(["finetune", *argv, "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing written
