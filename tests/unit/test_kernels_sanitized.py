"""kvserve's C kernels under AddressSanitizer: every exported kernel driven over awkward shapes with exactly
sized buffers (tests/csrc/sanitize_kernels.c), so a read or write past any buffer fails here.

It caught an out-of-bounds block-table read in the attention kernel's prefetch for block sizes below 16
(prefetches do not fault, so no other test could see it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kvserve.model import native
from tests.conftest import require_component

HARNESS = Path(__file__).resolve().parents[1] / "csrc" / "sanitize_kernels.c"
FLAGS = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-march=native", "-ffp-contract=off"]
FLAGS += ["-fno-math-errno", "-fopenmp"]


def _compiler() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    require_component(cc is not None, "a C compiler (gcc)", "apt-get install gcc")
    return cc


def test_kernels_have_no_out_of_bounds_access(tmp_path):
    cc = _compiler()
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    linked = subprocess.run([cc, "-fsanitize=address", str(probe), "-o", str(tmp_path / "probe")]).returncode == 0
    require_component(linked, "AddressSanitizer's runtime (libasan)", "it comes with apt-get install gcc")
    exe = tmp_path / "sanitize_kernels"
    sources = [str(HARNESS), *(str(s) for s in native.SOURCES)]
    subprocess.run([cc, *FLAGS, f"-I{native.CSRC}", *sources, "-o", str(exe), "-lm"], check=True)
    run = subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=300, env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"}
    )
    assert "AddressSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stderr[-4000:]
    assert "sanitized kernels: done" in run.stdout
