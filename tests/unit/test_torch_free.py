"""kv/, the scheduler and checkpoint placement import no torch (DESIGN.md rule 3): each is imported in a fresh
interpreter where `import torch` fails, and a control checks that the blocker really blocks torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

TORCH_FREE = [
    "kvserve.kv",
    "kvserve.kv.lru",
    "kvserve.kv.block_pool",
    "kvserve.kv.cache_manager",
    "kvserve.kv.tiers",
    "kvserve.kv.tiers.block_io",
    "kvserve.kv.tiers.stores",
    "kvserve.kv.tiers.codec",
    "kvserve.kv.tiers.manager",
    "kvserve.scheduler",
    "kvserve.recurrent.placement",
    "kvserve.recurrent.checkpoints",
]

# A meta-path finder that refuses torch and every torch submodule, installed before anything else is imported.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"{name} is blocked: this module must not import torch")
            return None

    sys.meta_path.insert(0, NoTorch())
    """
)


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + body], capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks_torch():
    result = _run("import torch\n")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    result = _run(f"import importlib, sys\nimportlib.import_module({module!r})\nassert 'torch' not in sys.modules\n")
    assert result.returncode == 0, f"importing {module} needs torch:\n{result.stderr}"
