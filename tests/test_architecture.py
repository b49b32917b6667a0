"""The architecture as docs/ARCHITECTURE.md states it, checked: layers that point down (no import cycle, the
optimizer layer importing nothing of the trainer, the CLI or argparse), the step, engine and fast path naming
no feature, and modules of about 400 lines at most."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gradproj
from gradproj.optim.features import every_component
from gradproj.rules import REGISTRY as RULES

SOURCE = Path(gradproj.__file__).parent
#: the optimizer layer and the layer of pure functions below it
INNER = ("gradproj.optim", "gradproj.projection", "gradproj.rules")
#: what the inner layers may not import: the machinery and applications above them, and the command line
OUTER = ("gradproj.train", "gradproj.bench", "gradproj.welore", "gradproj.memory", "gradproj.cli", "argparse")
#: the modules every method and feature passes through, which must ask components instead of naming them
CORE = ("optim/step.py", "optim/engine.py", "optim/fast.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports at run time, at any level (imports under ``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                ".".join([*package[: len(package) - node.level + 1], node.module or ""]) if node.level else node.module
            )
            base = (base or "").strip(".")
            # ``from package import module`` imports the module; ``from module import name``, the module
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return found


MODULES = {_module_name(p) for p in SOURCE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in SOURCE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in paths and m != name} for name, path in paths.items()}


def test_no_import_cycle() -> None:
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_optimizer_layer_imports_nothing_above_it() -> None:
    leaks = [
        (name, imported)
        for path in SOURCE.rglob("*.py")
        if (name := _module_name(path)).startswith(INNER)
        for imported in _imports(path)
        if imported.startswith(OUTER)
    ]
    assert not leaks


def test_the_step_the_engine_and_the_fast_path_name_no_feature() -> None:
    features = {c.name for c in every_component() if c.name not in ("none", "fixed")}
    rules = set(RULES) - {"adam"}
    presets = {"alice", "racs", "cosmos", "gradnorm", "stable_spam", "spike", "auto_rank", "adaptive"}
    words = sorted(features | rules | presets | {"weight_norm", "spam"})
    pattern = re.compile("|".join(map(re.escape, words)), re.IGNORECASE)
    named = [(core, m.group()) for core in CORE for m in pattern.finditer((SOURCE / core).read_text())]
    assert not named


def test_modules_stay_small() -> None:
    large = {
        str(p.relative_to(SOURCE)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not large


def test_the_twins_stand_alone() -> None:
    """The float64 twins import gradproj only for each other and the randomized SVD (whose singular vectors'
    signs LAPACK leaves open: docs in gradproj.optim.reference_bases); every other basis, the seeds, switching
    and 8-bit states are written out there, so a bug in the engine's cannot pass the twin suite."""
    twins = [p for p in (SOURCE / "optim").glob("reference*.py")]
    allowed = {"gradproj.projection.bases.rsvd_basis", "gradproj.projection.bases"}
    imported = {
        (path.name, name)
        for path in twins
        for name in _imports(path)
        if name.startswith("gradproj") and not name.startswith("gradproj.optim.reference") and name not in allowed
    }
    assert len(twins) >= 6 and not imported
