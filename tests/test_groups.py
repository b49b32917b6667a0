"""param_groups: targets, loud failure, and the summary."""

from __future__ import annotations

import pytest
import torch

import gradproj


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(32, 32), "v_proj": torch.nn.Linear(32, 32)})
        self.mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(32, 64), "down_proj": torch.nn.Linear(64, 32)})
        self.norm = torch.nn.LayerNorm(32)
        self.lm_head = torch.nn.Linear(32, 100, bias=False)


def _projected(groups: list[dict]) -> list[str]:  # type: ignore[type-arg]
    return [n for g in groups if "rank" in g for n in g["param_names"]]


def test_all_linear_excludes_the_head_and_keeps_everything_once() -> None:
    model = Tiny()
    groups = gradproj.param_groups(model, rank=8)
    assert _projected(groups) == [
        "attn.q_proj.weight",
        "attn.v_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_regex_and_name_list_targets() -> None:
    model = Tiny()
    assert _projected(gradproj.param_groups(model, target_modules=r"attn\.", rank=8)) == [
        "attn.q_proj.weight",
        "attn.v_proj.weight",
    ]
    assert _projected(gradproj.param_groups(model, target_modules=["v_proj", "down_proj"], rank=8)) == [
        "attn.v_proj.weight",
        "mlp.down_proj.weight",
    ]


def test_a_target_that_matches_nothing_fails_loudly() -> None:
    with pytest.raises(ValueError, match=r"target_modules=\['wq'\] matched no nn.Linear.*attn.q_proj"):
        gradproj.param_groups(Tiny(), target_modules=["wq"], rank=8)


def test_summary_reports_counts_and_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    groups = gradproj.param_groups(Tiny(), rank=8, summary=True)
    out = capsys.readouterr().out
    assert "rank 8" in out and "full" in out and "64x32" in out
    opt = gradproj.GaLoreAdamW(groups)
    assert opt.param_groups[0]["param_names"][0] == "attn.q_proj.weight"


def test_every_list_entry_and_pattern_must_match_something() -> None:
    with pytest.raises(
        ValueError, match=r"'no_such_module' matched no nn.Linear.*linear modules in this model: \[.*attn.q_proj"
    ):
        gradproj.param_groups(Tiny(), target_modules=["q_proj", "no_such_module"], rank=8)
    with pytest.raises(ValueError, match=r"'lm_head' matched no nn.Linear weight \(excluding \['lm_head'"):
        gradproj.param_groups(Tiny(), target_modules=["q_proj", "lm_head"], rank=8)  # excluded: nothing left to match
    with pytest.raises(ValueError, match=r"target_modules='wq\|wk' matched no nn.Linear"):
        gradproj.param_groups(Tiny(), target_modules="wq|wk", rank=8)


def test_unnamed_parameters_get_seeds_from_their_place_not_from_process_history() -> None:
    def seeds() -> list[int]:
        weights = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 16))]
        opt = gradproj.GaLoreAdamW([{"params": weights, "rank": 2, "projector": "random"}], lr=1e-2)
        for w in weights:
            w.grad = torch.randn_like(w)
        opt.step()
        return [opt.state[w]["proj_seed"] for w in weights]

    first = seeds()
    gradproj.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 2}])  # another optimizer between
    assert seeds() == first and first[0] != first[1]
