"""Journeys: the CLI end to end on inputs shaped unlike our defaults, as users bring them.

Every command (``pretrain``, ``finetune`` for both tasks, ``--resume``, ``export``, ``generate``,
``compress``, ``report``, ``memory``) runs on small odd inputs: long and multi-line responses, multi-turn
``messages``, non-ASCII text, line separators inside JSON strings, Latin-1 and mixed encodings, a corpus of
one huge line, an empty file in a folder of good ones, a JSONL with blank lines at its end, a corpus smaller
than one batch. Each finishes with exit 0 and its summary, or refuses with one line on stderr that names
the value; never a traceback (in-process, any exception fails the test), and a refusal leaves the run
folder it was pointed at exactly as it was. One journey runs the installed entry point in a process of its
own, so that the exit code and the absence of a traceback are the shell's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradproj.cli import main

TINY = ["--batch-size", "2", "--no-progress", "--no-tensorboard", "--steps", "2"]
PRETRAIN = ["pretrain", "--model", "llama-tiny", "--seq-len", "32", *TINY]


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _finishes(capsys: pytest.CaptureFixture[str], args: list[str], *expected: str) -> str:
    """The command exits 0, and its output holds each of ``expected``."""
    code, out, err = _run(capsys, args)
    assert code == 0, err
    for text in expected:
        assert text in out, (text, out)
    return out


def _refuses(capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> str:
    """The command exits non-zero with exactly one line on stderr (nothing on stdout but what it did before
    deciding), and that line holds ``expected``."""
    code, _, err = _run(capsys, args)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("gradproj"), lines[0]
    return lines[0]


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its relative path and content hash (modes included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    books = root / "books"
    (books / "nested").mkdir(parents=True)
    for i in range(3):
        (books / f"book{i}.txt").write_text(
            "\n\n".join(f"Book {i}, paragraph {j}: the quick brown fox jumps over the lazy dog." for j in range(40))
        )
    (books / "nested" / "café.txt").write_bytes(  # a Latin-1 book, named in UTF-8
        "\n\n".join(f"Un café {j}, déjà vu, naïve façade." for j in range(30)).encode("latin-1")
    )
    (books / "empty.txt").write_text("")
    (root / "one_line.txt").write_text("word " * 30_000)
    mixed = "Plain text.\n\nCafé in UTF-8.\n\n".encode() + "Café in Latin-1.\n\n".encode("latin-1")
    (root / "mixed.txt").write_bytes(mixed + b"More words here, and more.\n\n" * 200)
    (root / "small.txt").write_text("A short text.\n\nOf two paragraphs, a few windows long.\n\n" * 3)
    (root / "one.txt").write_text("Just a few words.")
    _jsonl(
        root / "long.jsonl", [_pair(i, "\n".join(f"Line {k} of a long answer." for k in range(30))) for i in range(24)]
    )
    (root / "long.jsonl").write_text((root / "long.jsonl").read_text() + "\n\n")  # blank lines at the end
    _jsonl(root / "chat.jsonl", [_messages(i) for i in range(24)])
    latin1 = [{"prompt": f"Question {i} : où ?", "response": "réponse naïve"} for i in range(12)]
    _jsonl(root / "latin1.jsonl", latin1, encoding="latin-1")
    _jsonl(root / "single.jsonl", [_pair(0, "only one")])
    (root / "broken.jsonl").write_text(json.dumps(_pair(0, "fine")) + "\n{not json\n")
    (root / "keys.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    return root


def _pair(i: int, response: str) -> dict[str, str]:
    return {"prompt": f"Question {i}: what comes next?\u2028(a line separator)", "response": response}


def _messages(i: int) -> dict[str, list[dict[str, str]]]:
    turns = [
        ("system", "Answer briefly."),
        ("user", f"Bonjour {i} 👋"),
        ("assistant", "Salut !"),
        ("user", "日本語は？"),
    ]
    return {"messages": [{"role": r, "content": c} for r, c in [*turns, ("assistant", f"はい、{i} — ça va.")]]}


def _jsonl(path: Path, rows: list[dict], encoding: str = "utf-8") -> None:  # type: ignore[type-arg]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))


@pytest.fixture(scope="module")
def base(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run pre-trained on the folder of books (an empty file and a Latin-1 one among them)."""
    run = tmp_path_factory.mktemp("runs") / "base"
    assert main([*PRETRAIN, "--steps", "3", "--data", str(inputs / "books"), "--out", str(run)]) == 0
    return run


# ----------------------------------------------------------------------------------------------- pretrain
def test_pretrain_on_a_folder_with_an_empty_and_a_latin1_file(base: Path) -> None:
    summary = json.loads((base / "summary.json").read_text())
    assert summary["steps"] == 3 and (base / "model" / "model.safetensors").is_file()
    data = json.loads((base / "config.json").read_text())["task"]["data"]
    assert "café.txt read as Windows-1252" in data and "1 empty file skipped" in data
    assert "files for training, 1 held out: " in data


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("one_line.txt", "(last 2 held out)"),  # 150,000 characters on one line: 4096-character pieces
        ("mixed.txt", "1 byte sequence that is not UTF-8 replaced by U+FFFD"),
        ("small.txt", "final perplexity"),  # a few windows, fewer than a batch of 8
    ],
)
def test_pretrain_on_odd_text(
    capsys: pytest.CaptureFixture[str], inputs: Path, tmp_path: Path, name: str, expected: str
) -> None:
    extra = ["--batch-size", "8", "--seq-len", "8"] if name == "small.txt" else []
    _finishes(capsys, [*PRETRAIN, *extra, "--data", inputs / name, "--out", tmp_path / "run"], expected)


def test_the_progress_bar_shows_each_held_out_evaluation(
    capsys: pytest.CaptureFixture[str], inputs: Path, tmp_path: Path
) -> None:
    args = [a for a in PRETRAIN if a != "--no-progress"]
    out = _finishes(capsys, [*args, "--steps", "3", "--eval-every", "1", "--data", inputs / "books", "--out", tmp_path])
    assert "step 1: held-out loss" in out and "step 2: held-out loss" in out  # the last is the summary's


def test_pretrain_refuses_too_little_text_in_one_line(
    capsys: pytest.CaptureFixture[str], inputs: Path, tmp_path: Path
) -> None:
    message = _refuses(capsys, [*PRETRAIN, "--data", inputs / "one.txt"], "1 document(s) of text; need at least 2")
    assert str(inputs / "one.txt") in message


# --------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("long.jsonl", "held-out    response loss"),  # long multi-line answers: no exact match, a summary
        ("chat.jsonl", "(22 examples for training, 2 held out)"),
        ("latin1.jsonl", "latin1.jsonl read as Windows-1252 (not UTF-8)"),
    ],
)
def test_causal_lm_finetuning_on_users_jsonl(
    capsys: pytest.CaptureFixture[str], inputs: Path, base: Path, tmp_path: Path, name: str, expected: str
) -> None:
    args = ["finetune", "--task", "causal-lm", "--model", base, "--data", inputs / name, *TINY, "--out", tmp_path]
    out = _finishes(capsys, args, expected, "final perplexity")
    assert "exact match" not in out or name != "long.jsonl"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("single.jsonl", "1 example; need at least 2 to hold one out"),
        ("broken.jsonl", "line 2 is not JSON"),
        ("keys.jsonl", "line 1 has neither string 'prompt' and 'response' nor 'messages'"),
        ("missing.jsonl", "no such file"),
    ],
)
def test_causal_lm_finetuning_refuses_bad_jsonl_in_one_line(
    capsys: pytest.CaptureFixture[str], inputs: Path, base: Path, name: str, expected: str
) -> None:
    args = ["finetune", "--task", "causal-lm", "--model", base, "--data", inputs / name, *TINY]
    assert name in _refuses(capsys, args, expected)


def test_classification_finetuning_finishes_with_its_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["finetune", *TINY, "--max-length", "24", "--eval-examples", "8", "--out", tmp_path / "run"]
    out = _finishes(capsys, args, "final accuracy", "AutoModelForSequenceClassification.from_pretrained")
    assert "gradproj generate" not in out  # a classifier generates no text


# ------------------------------------------------------------------------------------------- resume
def test_resume_with_more_steps_says_how_the_schedule_moves(
    capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    out = _finishes(capsys, ["pretrain", "--resume", run, "--steps", "5", "--no-progress"], "final perplexity")
    assert "resuming at step 3 of 5 (was 3)" in out


def test_a_refused_resume_leaves_the_run_as_it_was(capsys: pytest.CaptureFixture[str], base: Path) -> None:
    before = _fingerprint(base)
    message = _refuses(capsys, ["pretrain", "--resume", base, "--rank", "4"], "optim.rank: 16 (its default) -> 4")
    assert "resume with the original settings" in message
    assert _fingerprint(base) == before


# ------------------------------------------------------------------------------------ export and friends
def test_export_writes_a_readable_model_folder(capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path) -> None:
    _finishes(capsys, ["export", base, "--out", tmp_path / "model"], "exported")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes  # the weights as readable as the rest


@pytest.mark.parametrize("target", ["the run itself", "a file", "a folder of notes"])
def test_export_never_replaces_what_is_not_a_model(
    capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path, target: str
) -> None:
    out = {"the run itself": base, "a file": tmp_path / "notes.txt", "a folder of notes": tmp_path}[target]
    (tmp_path / "notes.txt").write_text("mine")
    before = _fingerprint(base), _fingerprint(tmp_path)
    expected = "a file is there" if target == "a file" else "a folder that is not a model folder"
    _refuses(capsys, ["export", base, "--out", out], expected)
    assert (_fingerprint(base), _fingerprint(tmp_path)) == before


def test_generate_continues_non_ascii_and_refuses_a_missing_folder(
    capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path
) -> None:
    out = _finishes(capsys, ["generate", base, "--prompt", "Café 日本 —", "--max-new-tokens", "5"], "Café 日本 —")
    assert out.strip()
    _refuses(capsys, ["generate", tmp_path / "nothing", "--prompt", "x"], "no such folder")


def test_compress_and_its_refusals(capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path) -> None:
    before = _fingerprint(base)
    _finishes(capsys, ["compress", base, "--ratio", "0.5", tmp_path / "small", "--eval-tokens", "0"], "written")
    assert (tmp_path / "small" / "welore.json").is_file()
    _refuses(capsys, ["compress", base, "--ratio", "1.5", tmp_path / "other"], "--ratio 1.5 is not valid")
    _refuses(capsys, ["compress", base, "--ratio", "0.5", base], "a folder that is not a model folder")
    assert _fingerprint(base) == before


def test_report_on_a_run_and_on_what_is_not_one(capsys: pytest.CaptureFixture[str], base: Path, tmp_path: Path) -> None:
    _finishes(capsys, ["report", base, "--out", tmp_path / "report.html"], "wrote")
    page = (tmp_path / "report.html").read_text()
    assert "none yet" in page  # 3 steps: no refresh after the first, and the table says why
    with pytest.raises(SystemExit, match="is not a run folder"):
        main(["report", str(tmp_path)])


def test_memory_plans_odd_shapes_and_refuses_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    out = _finishes(capsys, ["memory", "--model", "llama-tiny", "--batch-size", "1", "--seq-len", "7"], "MiB per")
    assert "Peak: the most held at once" in out
    _refuses(capsys, ["memory", "--model", "llama-3m"], "unknown model 'llama-3m'")


# --------------------------------------------------------------------------------------- the shell's view
def test_the_installed_command_fine_tunes_on_plain_sentences_and_exits_0(
    inputs: Path, base: Path, tmp_path: Path
) -> None:
    """The issue's case as a user ran it: ordinary prompt/response sentences, whose answers are too long for an
    exact match; the summary is printed and the process exits 0 with nothing on stderr but progress."""
    data = tmp_path / "my.jsonl"
    _jsonl(
        data, [{"prompt": f"Say something about {i}.", "response": f"{i} is a number I like a lot."} for i in range(20)]
    )
    command = [sys.executable, "-m", "gradproj.cli", "finetune", "--task", "causal-lm", "--model", str(base / "model")]
    command += [
        "--data",
        str(data),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--no-tensorboard",
        "--out",
        str(tmp_path / "r"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert "final perplexity" in done.stdout and "held-out    response loss" in done.stdout
