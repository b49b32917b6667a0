"""The documentation's code runs: every ```python block of README.md and docs/*.md is executed, and every
``gradproj`` command line in their shell blocks is parsed by the CLI's own parser, so a renamed flag, a
transformers upgrade that breaks an example (``TrainingArguments(warmup_ratio=...)`` in 5.x), or an API
change fails CI instead of a reader.

A block runs as written, in a fresh folder, unless an HTML comment on the line above it (invisible where
the Markdown is rendered) says what a reader brings and how to shrink it to seconds::

    <!-- snippet {"given": {"model": "tiny_llama", "data": "batches"},
                  "replace": {"range(1000)": "range(2)"}, "setup": "step = 1",
                  "files": {"runs/my-run": "tiny_run"}} -->

``given`` binds names to the fixtures below (a line ``model = ...`` of the block is then the reader's own
model, and is skipped), ``replace`` edits the text, ``setup`` runs first, ``files`` copies a fixture folder
to a path the block reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!-- snippet (\{.*\}) -->$")


@dataclass
class Block:
    """One fenced code block: where it is, its language, its text and the directive above it."""

    path: Path
    line: int
    language: str
    text: str
    directive: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found, lines, index = [], path.read_text().splitlines(), 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        directive = DIRECTIVE.match(lines[index - 1]) if index else None
        text = "\n".join(lines[index + 1 : end])
        found.append(Block(path, index + 1, opened.group(1), text, json.loads(directive.group(1)) if directive else {}))
        index = end + 1
    return found


ALL = [block for path in DOCS for block in blocks(path)]
PYTHON = [block for block in ALL if block.language == "python"]


# ------------------------------------------------------------------------------------------------ fixtures
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    return LlamaForCausalLM(config)


def batches() -> list[dict[str, torch.Tensor]]:
    """Four batches of 2 x 16 tokens with their labels (the model computes its own loss)."""
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(4)]
    return [{"input_ids": x, "labels": x} for x in ids]


def examples() -> list[dict[str, torch.Tensor]]:
    """A dataset for transformers' Trainer: eight examples of 16 tokens."""
    return [{"input_ids": row, "labels": row} for batch in batches() for row in batch["input_ids"]]


def galore_optimizer() -> torch.optim.Optimizer:
    import gradproj

    return gradproj.GaLoreAdamW(gradproj.param_groups(tiny_llama(), rank=8), lr=1e-2)


GIVEN: dict[str, Callable[[], Any]] = {
    "tiny_llama": tiny_llama,
    "batches": batches,
    "examples": examples,
    "galore_optimizer": galore_optimizer,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gradproj run folder (two steps of llama-tiny on the embedded corpus)."""
    from gradproj.cli import main

    run = tmp_path_factory.mktemp("docs") / "run"
    args = ["pretrain", "--model", "llama-tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    assert main([*args, "--no-progress", "--no-tensorboard", "--out", str(run)]) == 0
    return run


def _prepared(block: Block) -> str:
    """The block's text with its directive's replacements, and the reader's own ``name = ...`` lines dropped
    for the names it is given."""
    text = block.text
    for old, new in block.directive.get("replace", {}).items():
        assert old in text, f"{block.name}: the directive replaces {old!r}, which the block no longer holds"
        text = text.replace(old, new)
    for name in block.directive.get("given", {}):
        text = re.sub(rf"^{name} = \.\.\..*$", "pass", text, flags=re.M)
    return text


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_blocks_run(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {name: GIVEN[what]() for name, what in block.directive.get("given", {}).items()}
    for target, fixture in block.directive.get("files", {}).items():
        shutil.copytree(request.getfixturevalue(fixture), tmp_path / target)
    exec(compile(block.directive.get("setup", ""), f"{block.name} (setup)", "exec"), namespace)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(_prepared(block), block.name, "exec"), namespace)


# ----------------------------------------------------------------------------------------------- commands
def _logical_lines(text: str) -> list[str]:
    """Shell lines with their continuations joined and a leading ``$`` prompt dropped."""
    out, current = [], ""
    for line in text.splitlines():
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            out.append(current.removeprefix("$ ").strip())
            current = ""
    return out


ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=\S")
LOOP = re.compile(r"^for (\w+) in ([^;]+); do\b")


def commands(block: Block) -> list[list[str]]:
    """Each ``gradproj`` invocation of a shell block as the argv the CLI would get: bash expands it (with the
    block's variable assignments before it, and each ``for`` variable at its first value); lines holding a
    ``...`` placeholder are left out."""
    context: list[str] = []
    found = []
    for line in _logical_lines(block.text):
        loop = LOOP.match(line)
        if loop:
            context.append(f"{loop.group(1)}={shlex.quote(loop.group(2).split()[0])}")
            line = line[loop.end() :].strip()
        if ASSIGNMENT.match(line) and "$(" not in line and "`" not in line and "gradproj" not in line:
            context.append(line)
            continue
        words = line.split()
        while words and ASSIGNMENT.match(words[0]):  # VAR=value before the command
            words = words[1:]
        invoked = words[:1] == ["gradproj"] or (
            words[:1] in (["python"], ["python3"], ["torchrun"]) and "gradproj.cli" in words
        )
        if "..." in words or not invoked:  # an output line, another program, or a placeholder
            continue
        command = re.sub(r"\s*(&|;\s*done)\s*$", "", line)
        script = "set -f\n" + "\n".join(context) + f"\nprintf '%s\\0' {command}"
        expanded = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
        argv = [w for w in expanded.split("\0") if w]
        while argv and "=" in argv[0] and argv[0].split("=")[0].isupper():  # VAR=value before the command
            argv = argv[1:]
        start = argv.index("gradproj.cli") if "gradproj.cli" in argv else argv.index("gradproj")
        found.append(argv[start + 1 :])
    return found


SHELL = [block for block in ALL if block.language in ("bash", "sh", "console", "") and commands(block)]


@pytest.mark.parametrize("block", SHELL, ids=[b.name for b in SHELL])
def test_every_documented_command_parses(block: Block) -> None:
    from gradproj.cli import build_parser

    for argv in commands(block):
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv)
        except SystemExit as stop:
            assert not stop.code, f"{block.name}: gradproj {' '.join(argv)}: {errors.getvalue().strip()}"


def test_the_documents_hold_what_these_tests_run() -> None:
    """The collection is not empty by accident: the README's API example and its command lines are in it."""
    assert any(b.path.name == "README.md" for b in PYTHON) and len(PYTHON) >= 7
    assert sum(len(commands(b)) for b in SHELL) >= 90
