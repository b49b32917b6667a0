"""WeLore: ranks from the weights' spectra within a size (and the uniform baseline at the same size),
``gradproj compress`` writing a folder transformers loads with each low-rank component at its rank,
``gradproj finetune --welore`` training those components' factors alone and exporting them merged, the
report's spectra, and bad input in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradproj.cli import main
from gradproj.optim.build import OptimizerSpec
from gradproj.train import FinetuneConfig, PretrainConfig, pretrain
from gradproj.welore import LowRankLinear, factorize, merge, normalized, plan_of, uniform_ranks, welore_ranks

SHAPES = {"a": (64, 48), "b": (64, 48), "c": (48, 96)}


def spectra(decay: dict[str, float]) -> dict[str, torch.Tensor]:
    """Singular values ``exp(-decay * i)``: a large decay is a heavy low-rank matrix, a small one a flat one."""
    return {n: torch.exp(-decay[n] * torch.arange(min(SHAPES[n]), dtype=torch.float64)) for n in SHAPES}


def size(plans: dict[str, Any]) -> int:
    return sum(p.parameters for p in plans.values())


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_welore_ranks_fill_the_budget_and_follow_each_spectrum(ratio: float) -> None:
    s = spectra({"a": 0.3, "b": 0.02, "c": 0.1})
    plans = welore_ranks(s, SHAPES, ratio)
    dense = sum(m * n for m, n in SHAPES.values())
    assert size(plans) <= ratio * dense
    # one threshold for every matrix: the fastest-decaying spectrum keeps the fewest directions
    assert plans["a"].rank < plans["c"].rank
    # the lowest threshold that fits: lowering it by one step (keeping the next direction) overshoots
    scaled = {n: normalized(v) for n, v in s.items()}
    kept = [float(v) for n, v in scaled.items() for v in v[: plans[n].rank] if plans[n].low_rank]
    dropped = max(float(v) for n, v in scaled.items() for v in v[plans[n].rank :] if plans[n].low_rank)
    assert dropped < min(kept)
    looser = {n: plan_of(SHAPES[n], int((scaled[n] >= dropped).sum())) for n in SHAPES}
    assert size(looser) > ratio * dense


def test_uniform_ranks_keep_one_share_of_every_rank_at_the_same_size() -> None:
    plans = uniform_ranks(SHAPES, 0.5)
    assert size(plans) <= 0.5 * sum(m * n for m, n in SHAPES.values())
    assert len({p.rank / min(p.shape) for p in plans.values()}) == 1
    bigger = {n: plan_of(shape, plans[n].rank + 1) for n, shape in SHAPES.items()}
    assert size(bigger) > 0.5 * sum(m * n for m, n in SHAPES.values())


def test_a_matrix_whose_factors_are_not_smaller_stays_dense() -> None:
    assert plan_of((8, 8), 4).low_rank is False and plan_of((8, 8), 4).rank == 8  # 4 * 16 = 64, not < 64
    assert plan_of((8, 8), 3).low_rank is True and plan_of((8, 8), 3).parameters == 48


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2, True])
def test_a_ratio_outside_zero_one_is_refused(ratio: Any) -> None:
    with pytest.raises(ValueError, match=rf"--ratio {ratio!r} is not valid; expected a number in \(0, 1\)"):
        welore_ranks(spectra({"a": 0.1, "b": 0.1, "c": 0.1}), SHAPES, ratio)


def test_a_ratio_below_rank_one_everywhere_names_the_least() -> None:
    least = sum(m + n for m, n in SHAPES.values()) / sum(m * n for m, n in SHAPES.values())  # rank-1 factors
    message = rf"--ratio 0.001 is below what rank 1 everywhere keeps \({least:.4f} .*\[{least:.4f}, 1\)"
    with pytest.raises(ValueError, match=message):
        uniform_ranks(SHAPES, 0.001)


def test_factorize_is_exact_on_a_rank_k_weight_and_merge_restores_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    with torch.no_grad():
        u, v = torch.randn(32, 5), torch.randn(5, 16)
        model[0].weight.copy_(u @ v)  # rank 5
    x = torch.randn(4, 16)
    before, weight = model(x), model[0].weight.detach().clone()
    trainable = factorize(model, {"0": 5})
    assert isinstance(model[0], LowRankLinear) and trainable == 5 * (32 + 16) + 32 + 8  # factors and biases
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.up", "0.down", "0.bias", "2.bias"]
    assert not model[2].weight.requires_grad  # a matrix that is not a low-rank component is frozen
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    merge(model)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model[0].weight, weight, rtol=1e-5, atol=1e-5)


def test_factorize_refuses_a_weight_that_is_no_longer_rank_k() -> None:
    model = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(ValueError, match=r"0 is no longer rank 3 \(its rank-3 truncation loses .* of its norm\)"):
        factorize(model, {"0": 3})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("welore") / "base"
    tiny = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=512, progress=False, tensorboard=False)
    pretrain(PretrainConfig(**tiny, steps=8, out=str(out)))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def compressed(trained: Path) -> Path:
    out = trained.parent / "compressed"
    assert main(["compress", str(trained), "--ratio", "0.5", str(out), "--seq-len", "32", "--eval-tokens", "1024"]) == 0
    return out


def test_compress_writes_a_folder_with_each_component_at_its_rank(trained: Path, compressed: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = json.loads((compressed / "welore.json").read_text())
    assert data["method"] == "welore" and data["matrix_parameters"]["kept"] <= 0.5
    assert data["heldout_ppl"]["before"] > 1 and data["heldout_ppl"]["after"] > 1
    model = AutoModelForCausalLM.from_pretrained(compressed)
    original = load_file(str(trained / "model" / "model.safetensors"))
    for name, m in data["matrices"].items():
        weight = model.get_submodule(name).weight.detach()
        assert list(weight.shape) == m["shape"] and len(m["singular_values"]) == min(m["shape"])
        if m["low_rank"]:
            assert int(torch.linalg.matrix_rank(weight.double(), rtol=1e-5)) == m["rank"] < min(m["shape"])
        else:
            assert torch.equal(weight, original[f"{name}.weight"])
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])  # only matrices change


def test_uniform_compression_is_the_same_size(trained: Path, compressed: Path) -> None:
    out = trained.parent / "uniform"
    args = ["compress", str(trained), "--ratio", "0.5", str(out), "--method", "uniform", "--eval-tokens", "0"]
    assert main(args) == 0
    data = json.loads((out / "welore.json").read_text())
    ranks = {m["rank"] / min(m["shape"]) for m in data["matrices"].values() if m["low_rank"]}
    assert len(ranks) == 1 and data["heldout_ppl"]["before"] is None
    welore = json.loads((compressed / "welore.json").read_text())["matrix_parameters"]["dense"]
    assert data["matrix_parameters"]["dense"] == welore and data["matrix_parameters"]["kept"] <= 0.5


def test_finetune_welore_trains_only_the_components_and_exports_them_merged(compressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    args = ["finetune", "--task", "causal-lm", "--model", str(compressed), "--welore", "--optimizer", "adamw",
            "--steps", "4", "--eval-every", "4", "--save-every", "2", "--max-length", "64", "--eval-examples", "8",
            "--no-progress", "--no-tensorboard", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads((compressed / "welore.json").read_text())
    before = load_file(str(compressed / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert sorted(before) == sorted(after)  # the standard architecture again: factors merged
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lrcs = {f"{n}.weight" for n, m in data["matrices"].items() if m["low_rank"]}
    assert lrcs <= changed and changed - lrcs and all(before[k].dim() == 1 for k in changed - lrcs)  # and norms
    for key in changed & lrcs:  # each component stays at its rank
        rank = data["matrices"][key.removesuffix(".weight")]["rank"]
        assert int(torch.linalg.matrix_rank(after[key].double(), rtol=1e-5)) <= rank
    summary = json.loads((out / "summary.json").read_text())
    lrc = [m for m in data["matrices"].values() if m["low_rank"]]
    norms = [v for v in before.values() if v.dim() == 1]
    trainable = sum(m["rank"] * sum(m["shape"]) for m in lrc) + sum(v.numel() for v in norms)
    # AdamW's two float32 moments of the factors and norms, and torch's float32 step count of each tensor
    assert summary["optimizer_state_bytes"] == 2 * 4 * trainable + 4 * (2 * len(lrc) + len(norms))
    exported = tmp_path / "exported"  # a checkpoint's factors export merged too
    assert main(["export", str(out / "checkpoints" / "step-00000002"), "--out", str(exported)]) == 0
    assert sorted(load_file(str(exported / "model.safetensors"))) == sorted(before)
    assert main(["report", str(out)]) == 0
    assert "Weight spectra" in (out / "report.html").read_text()


def test_pretrain_welore_continues_only_the_components(compressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "continued"
    args = ["pretrain", "--init-from", str(compressed), "--welore", "--optimizer", "adamw", "--steps", "3",
            "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "512", "--no-progress", "--no-tensorboard",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads((compressed / "welore.json").read_text())
    before = load_file(str(compressed / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k]) and before[k].dim() == 2}
    assert changed == {f"{n}.weight" for n, m in data["matrices"].items() if m["low_rank"]}  # embeddings frozen
    exported = tmp_path / "exported"
    assert main(["export", str(out), "--out", str(exported)]) == 0  # the newest checkpoint, merged
    torch.testing.assert_close(load_file(str(exported / "model.safetensors")), after, rtol=1e-6, atol=1e-6)


def test_welore_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--welore", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--welore continues pre-training the low-rank components" in err and "--init-from COMPRESSED" in err
    assert main(["finetune", "--welore", "--task", "bbc-news", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--welore with --task bbc-news: .* use --task causal-lm --model COMPRESSED", err)
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"--welore with --optimizer lora-peft: the components' factors train with"):
        FinetuneConfig(task="causal-lm", welore=True, optim=OptimizerSpec(name="lora-peft"))


def test_welore_on_a_model_without_components_is_refused(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["finetune", "--task", "causal-lm", "--model", str(trained), "--welore", "--steps", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has no low-rank components (welore.json not found" in err and len(err.strip().splitlines()) == 1


def test_compress_bad_ratio_is_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress", str(trained), "--ratio", "1.5", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--ratio 1.5 is not valid; expected a number in (0, 1)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_finetune_table_compares_each_mode_with_full_fine_tunings_best_rate() -> None:
    from gradproj.bench.welore import finetune_table

    def rec(mode: str, lr: float, seed: int, loss: float, state: int) -> dict[str, Any]:
        return {"kind": "finetune", "mode": mode, "lr": lr, "seed": seed, "loss": loss, "optimizer_state_bytes": state,
                "trainable": state // 8}  # fmt: skip

    records = [rec("full", 1e-3, s, 4.0 + s / 10, 8 * 2**20) for s in range(3)] + [rec("full", 3e-3, 0, 4.5, 8 * 2**20)]
    records += [rec("lrc", 1e-3, s, 4.2 + s / 10, 2**20) for s in range(3)]
    lines = finetune_table(records).splitlines()
    assert lines[2].startswith("| every weight | 0.001 | 3 | 4.1000 | 4.0000 - 4.2000 | 1.0000 | - |")
    assert lines[4].startswith(
        "| low-rank components and norms (--welore) | 0.001 | 3 | 4.3000 | 4.2000 - 4.4000 | 1.0488 |"
    )
    assert lines[4].endswith("| 1.00 | 0.125 |")  # a MiB of state, an eighth of full fine-tuning's


def test_a_manifest_without_components_is_refused(tmp_path: Path) -> None:
    from gradproj.welore import read_manifest

    matrices = {"model.layers.0.mlp.up_proj": {"shape": [8, 8], "rank": 8, "low_rank": False, "singular_values": []}}
    (tmp_path / "welore.json").write_text(json.dumps({"matrices": matrices}))
    with pytest.raises(ValueError, match=r"--model X has no low-rank components: every matrix in .* is kept dense"):
        read_manifest(tmp_path, "--model X")
