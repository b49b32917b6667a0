"""The toy method of tests/toy_method.py through the trainer: it learns, and a resumed run (standard and
layer-wise) ends bit-identical to the uninterrupted one. Collected only when tests/test_toy_method.py runs it
with the toy registered (the file name keeps the ordinary suite from collecting it)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradproj.train import PretrainConfig, pretrain
from gradproj.train.text import prepare_pretrain_data

TINY = dict(model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=2048, progress=False, tensorboard=False)


@pytest.mark.parametrize("layerwise", [False, True], ids=["galore_lion", "galore_lion-layerwise"])
def test_the_toy_learns_and_resumes_bit_identical(tmp_path: Path, layerwise: bool) -> None:
    data = prepare_pretrain_data(None, None, 4096, 32)
    optim = {"name": "galore_lion", "update_proj_gap": 5, "lr": 3e-3}
    cfg = PretrainConfig.from_dict({**TINY, "steps": 12, "save_every": 7, "keep": 5, "layerwise": layerwise,
                                    "optim": optim})  # fmt: skip
    full = pretrain(replace(cfg, out=str(tmp_path / "full")), data=data)
    assert sum(full.losses[-3:]) < sum(full.losses[:3])
    shutil.copytree(tmp_path / "full/checkpoints/step-00000007", tmp_path / "part/checkpoints/step-00000007")
    resumed = pretrain(replace(cfg, out=str(tmp_path / "part")), resume=tmp_path / "part", data=data)
    assert resumed.losses == full.losses[7:]
    last = "checkpoints/step-00000012/model.safetensors"
    a, b = load_file(tmp_path / "full" / last), load_file(tmp_path / "part" / last)
    assert all(torch.equal(a[k], b[k]) for k in a)
