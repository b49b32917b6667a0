"""The embedded corpus, its tokenizer, and the command line end to end (real text, tiny runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from gradproj.cli import main
from gradproj.data import encode_corpus, load_corpus, train_tokenizer
from gradproj.projection import PROJECTORS


@pytest.fixture(scope="module")
def corpus():  # type: ignore[no-untyped-def]
    return load_corpus()


def test_corpus_is_split_by_play_without_overlap(corpus) -> None:  # type: ignore[no-untyped-def]
    assert "hamlet_gut.txt" in corpus.validation_plays
    assert not set(corpus.train_plays) & set(corpus.validation_plays)
    assert len(corpus.train) > 10 * len(corpus.validation) > 100_000
    assert "To be, or not to be" in corpus.validation and "To be, or not to be" not in corpus.train
    assert not any(name.endswith("_f.txt") for name in corpus.train_plays)  # no First-Folio near-duplicates


def test_tokenizer_round_trips_real_text(corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = train_tokenizer(corpus.train, 4096)
    sample = corpus.validation[:2000] + "\n\nExeunt."
    ids = encode_corpus(tokenizer, sample, cache=tmp_path)
    assert tokenizer.decode(ids.tolist()) == sample + "\n\n"
    assert ids.numel() < len(sample) / 2  # BPE actually compresses English (bytes would be 1 per char)
    expected = [i for chunk in sample.split("\n\n") for i in tokenizer.encode(chunk + "\n\n").ids]
    assert ids.tolist() == expected  # each document encoded on its own (a batch of them, in order)
    (cached,) = (tmp_path / "tokens").iterdir()
    torch.save(ids[:3], cached)  # the cache is what is read back (a stale entry would show)
    assert encode_corpus(tokenizer, sample, cache=tmp_path).tolist() == ids[:3].tolist()


def test_demo_learns_real_text_below_the_unigram_baseline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    final = re.search(r"final held-out perplexity: ([\d.]+) .*unigram baseline ([\d.]+)", text)
    assert final is not None
    assert float(final.group(1)) < 0.7 * float(final.group(2))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"adamw", "galore_adamw", "fira_adamw", "apollo_mini"}
    assert all(r["config"]["seed"] == 0 and r["versions"]["torch"] for r in records)
    by_method = {r["method"]: r for r in records}
    assert by_method["galore_adamw"]["state_bytes"] < by_method["adamw"]["state_bytes"]
    # the same records render as a table
    assert main(["bench", "table", str(out)]) == 0
    assert "| galore_adamw |" in capsys.readouterr().out


def test_same_seed_gives_the_same_losses(tmp_path: Path) -> None:
    from gradproj.bench.methods import get_method
    from gradproj.bench.quality import bench_config, prepare_data, run

    cfg = bench_config(model="llama-1m", steps=4, batch_size=4, seq_len=32, rank=8, gap=2, eval_windows=8)
    data = prepare_data(cfg)
    for name in ("fira_adamw", "apollo_mini"):  # an SVD basis and a seeded random one
        method = get_method(name)
        first = run(method, 1e-2, 1e-2, data, cfg, tmp_path / "a")
        second = run(method, 1e-2, 1e-2, data, cfg, tmp_path / "b")
        assert first["val_loss"] == second["val_loss"]
        assert first["train_loss_last10"] == second["train_loss_last10"]


def test_refresh_benchmark_runs_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "refresh", "--shape", "96", "128", "--rank", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in PROJECTORS)


def test_cli_errors_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--lr-matrix", "fast"])
    assert "'fast' is not a comma-separated list of numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown method"):
        main(["bench", "quality", "--methods", "sgd", "--steps", "1"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["bench", "table", "no-such-file.jsonl"])
