"""bench/'s rules, checked rather than remembered: no script there imports tests/, and bench/golden_inputs.py
holds the golden tests' own inputs (bench/cuda_check.py reports on them)."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
NOT_OURS = {"peers", "models", "results", "__pycache__"}  # built peers and models (git-ignored), outputs


def _bench_scripts() -> list[Path]:
    scripts = []
    for root, dirs, files in os.walk(BENCH):
        dirs[:] = [d for d in dirs if d not in NOT_OURS]
        scripts += [Path(root) / f for f in files if f.endswith(".py")]
    return scripts


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_bench_script_imports_tests():
    scripts = _bench_scripts()
    assert BENCH / "offline.py" in scripts and BENCH / "experiments" / "gemm_backends.py" in scripts
    assert [str(p.relative_to(BENCH)) for p in scripts if "tests" in _top_level_imports(p)] == []


def test_golden_inputs_are_the_golden_tests_own():
    from tests.hybrid_models import bamba_config
    from tests.model.test_golden import DOC, PROMPTS

    spec = importlib.util.spec_from_file_location("bench_golden_inputs", BENCH / "golden_inputs.py")
    golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden)
    assert golden.PROMPTS == PROMPTS and golden.DOC == DOC
    assert golden.small_bamba_config(hidden_size=128).to_dict() == bamba_config(hidden_size=128).to_dict()
