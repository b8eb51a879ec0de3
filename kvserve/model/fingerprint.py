"""model_fingerprint: a short stable id of a model's weights, the part of the KV tiers' keys that names the
model (kvserve/kv/tiers/manager.py), so stored KV is only ever read back by the same weights."""

from __future__ import annotations

import hashlib
import json

import torch


def model_fingerprint(config: object, weights: dict[str, torch.Tensor]) -> str:
    """A short stable id of a model's weights: SHA-256 of its config and of every tensor, all of its values.

    Independent of file format, storage dtype and path (each tensor is hashed as float32), so the same weights
    loaded from GGUF or safetensors on any replica share entries, and weights that differ anywhere never do.
    Reads every weight once: about 0.3 s per GB of float32 on one core (the engine computes it once per
    loaded model, and only when a KV tier is configured).
    """
    h = hashlib.sha256(
        json.dumps(
            config.__dict__ if hasattr(config, "__dict__") else str(config), sort_keys=True, default=str
        ).encode()
    )
    for name in sorted(weights):
        t = weights[name]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1).numpy().data)
    return h.hexdigest()[:16]
