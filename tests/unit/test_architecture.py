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
    assert "4 kept, 0 broken" in run.stdout, run.stdout


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


def test_a_single_server_never_imports_ray():
    """Ray is for `kvserve serve --replicas N` only: the CLI, the server and the engine import without it."""
    modules = "kvserve.cli, kvserve.server.app, kvserve.engine, kvserve.router.router"
    code = f"import sys, {modules}; print('ray' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr
