"""Which arithmetic runs attention and the linear layers: resolved once at start, then passed on.

    attention  native: kvserve's fused CPU kernel (csrc/paged_attention.c) | torch: kvserve/model/attention.py
    linear     native: kvserve's CPU GEMM kernel (csrc/linear.c)           | onednn: oneDNN (model/invariant.py)

EngineConfig.attention_backend / linear_backend choose; `auto` takes $KVSERVE_ATTENTION / $KVSERVE_LINEAR
when set, else the kernel wherever it builds for the device and dtype. The paths round differently, so one
engine never mixes them, and `tag` names the arithmetic in the keys of KV blocks shared across processes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from kvserve.model import invariant, native

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backends:
    native_attention: bool
    native_linear: bool

    def tag(self, device: torch.device, dtype: torch.dtype) -> str:
        """Names the arithmetic KV blocks are computed with (KV at layer > 0 depends on every layer below):
        replicas sharing a KV store exchange only blocks made the same way."""
        lib = native.load()
        amx = dtype == torch.bfloat16 and lib is not None and lib.kvserve_linear_features() & 4  # rounds apart
        lin = f"-lin{native.LINEAR_ARITHMETIC}" + ("-amx" if amx else "") if self.native_linear else ""
        if not self.native_attention:
            return f"torch-{device.type}{lin}"
        dp = dtype == torch.bfloat16 and lib is not None and lib.kvserve_attention_features() & 1
        return f"k{native.ARITHMETIC}" + ("-dpbf16" if dp else "") + lin


def resolve_backends(
    device: torch.device,
    dtype: torch.dtype,
    attention: str = "auto",
    linear: str = "auto",
    model_gaps: str | None = None,
) -> Backends:
    """The backends to run; ValueError when a kernel asked for by name cannot run here.

    model_gaps: what the model needs that the attention kernel does not implement (families.attention_kernel_gaps,
    e.g. sliding windows): then attention runs on the torch path, and asking for the kernel is an error.
    """
    where = f"here: {device.type}, {str(dtype).removeprefix('torch.')}"
    needs = f"a CPU device, float32 or bfloat16, and a C compiler with OpenMP ({where})"
    if model_gaps is not None:
        needs = f"a model without {model_gaps} (this model has them; the kernel does not implement them)"
        if attention == "auto":
            logger.info("attention runs on the torch path: the kernel does not implement %s", model_gaps)
    backends = Backends(
        native_attention=_choose(
            "attention_backend",
            attention,
            "KVSERVE_ATTENTION",
            "torch",
            native.kernel_attention_available(device, dtype) and model_gaps is None,
            needs,
        ),
        native_linear=_choose(
            "linear_backend",
            linear,
            "KVSERVE_LINEAR",
            "onednn",
            native.kernel_linear_available(device, dtype),
            f"a CPU with AVX-512 (AVX512-BF16 for bfloat16) and a C compiler ({where})",
        ),
    )
    if device.type == "cpu" and not backends.native_linear and not invariant.onednn_rows_invariant(dtype):
        problem = (
            f"oneDNN's {str(dtype).removeprefix('torch.')} linear layers on this CPU (seen with AMX) give a row "
            "different bits depending on how many rows share the call, so outputs would change with the batch"
        )
        if linear == "onednn" or (linear == "auto" and os.environ.get("KVSERVE_LINEAR") == "onednn"):
            raise ValueError(f"linear_backend onednn: {problem}; use native (kvserve's kernel) or float32")
        logger.warning("%s: kvserve's linear kernel does not run here (%s)", problem, where)
    return backends


def _choose(name: str, asked: str, env_var: str, other: str, kernel_runs: bool, needs: str) -> bool:
    """Whether the kernel runs: `auto` = the kernel where it runs unless the environment variable names the
    other path; `native` where it cannot run is an error, not a silent fallback."""
    if asked == "auto":
        return os.environ.get(env_var, "native") != other and kernel_runs
    if asked == "native" and not kernel_runs:
        raise ValueError(f"{name} native needs {needs}; use auto or {other}")
    return asked == "native"
