"""docs/ARCHITECTURE.md's worked example, checked: a method defined outside gradproj (tests/toy_method.py, GaLore
with Lion's update: a rule class, a preset class, a float64 twin, one registry entry) is picked up by the contract,
torch-contract and twin suites from the registries, and trains and resumes through the trainer, with no other
edit. It runs in a subprocess, with the toy loaded as a plugin before collection, so that nothing registered there
reaches this process's registries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gradproj

TESTS = Path(__file__).parent
#: each suite, and the fewest of its tests the toy must have passed there (every item the registries give it)
SUITES = {"test_contract.py": 30, "test_torch_contract.py": 20, "test_reference_twins.py": 18, "toy_trains.py": 2}


def test_a_method_from_outside_is_its_module_plus_one_registry_entry() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-p", "toy_method", "-p", "no:cacheprovider", "-rA", "-q",
               "-W", "ignore::UserWarning", "-k", "galore_lion or GaLoreLion",
               *(str(TESTS / name) for name in SUITES)]  # fmt: skip
    result = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = Counter(re.findall(r"^PASSED tests/([\w.]+)::", result.stdout, re.MULTILINE))
    assert all(passed[name] >= least for name, least in SUITES.items()), passed
    assert not re.search(r"^(FAILED|ERROR) ", result.stdout, re.MULTILINE)
    assert "galore_lion" not in gradproj.PRESETS  # the registration stayed in its process
