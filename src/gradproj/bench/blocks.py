"""The generated blocks of ``docs/BENCHMARKS.md``: one registry of block kinds, each a table of its records.

A generated block sits between ``<!-- bench:KIND FILE -->`` and ``<!-- /bench -->``; ``FILE`` is a
record file relative to the document. :func:`update_document` rewrites every block from its records,
so the published numbers are always the committed records' (a test checks the two agree). A new kind of
table is its function and one entry in :data:`BLOCKS`.

Example:
    >>> print(render_block("overhead", []).splitlines()[0])
    | device | model | sampled every | step ms, off | step ms, on | overhead |
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .adaptive import adaptive_table, adaptive_verdict
from .comm import comm_table, spread_table
from .policy import policy_table, policy_verdict
from .precision import memory_table, precision_table
from .refresh import format_rows
from .seeds import pareto_table, seeds_table, verdict
from .sft import sft_table
from .speed import optimizer_step_table, speed_table
from .state_classes import lead_verdict, state_class_table
from .tables import environment_line, overhead_table, read_records, table
from .welore import compression_table, finetune_table

Records = list[dict[str, Any]]

#: every kind of generated block a document may hold (``<!-- bench:KIND records/FILE.jsonl -->``), by name
BLOCKS: dict[str, Callable[[Records], str]] = {
    "quality": table,
    "refresh": format_rows,
    "environment": environment_line,
    "overhead": overhead_table,
    "seeds": seeds_table,
    "verdict": verdict,
    "pareto": pareto_table,
    "state_classes": state_class_table,
    "lead": lead_verdict,
    "speed": speed_table,
    "optimizer_step": optimizer_step_table,
    "precision": precision_table,
    "memory": memory_table,
    "comm": comm_table,
    "spread": spread_table,
    "sft": sft_table,
    "adaptive": adaptive_table,
    "adaptive_verdict": adaptive_verdict,
    "policy": policy_table,
    "policy_verdict": policy_verdict,
    "welore": compression_table,
    "welore_finetune": finetune_table,
}
_BLOCK = re.compile(r"(<!-- bench:(\w+) (\S+) -->\n)(.*?)(<!-- /bench -->)", re.DOTALL)


def render_block(kind: str, records: Records) -> str:
    """The Markdown of one generated block."""
    if kind not in BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}; valid: {tuple(BLOCKS)}")
    return BLOCKS[kind](records)


def update_document(path: Path) -> tuple[str, str]:
    """The document's text and the text with every generated block rebuilt from its records."""
    text = path.read_text()

    def rebuild(match: re.Match[str]) -> str:
        opening, kind, source = match.group(1), match.group(2), match.group(3)
        records = read_records([path.parent / source])
        return f"{opening}{render_block(kind, records)}\n{match.group(5)}"

    return text, _BLOCK.sub(rebuild, text)
