"""The walls between the engine's parts, as import-linter checks them (contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), "import-linter is a test dependency (pyproject.toml [test])"
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout, run.stdout


def test_a_broken_contract_is_reported(tmp_path):
    """The check can fail: a config whose contract the code breaks (the engine imports the scheduler)."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "kvserve"\n\n[[tool.importlinter.contracts]]\nname = "probe"\n'
        'type = "forbidden"\nsource_modules = ["kvserve.engine"]\nforbidden_modules = ["kvserve.scheduler"]\n'
    )
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run(
        [str(lint), "--no-cache", "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0 and "BROKEN" in run.stdout
