"""Model side of kvserve: config, tokenizer, weight loading and the forward pass."""

from __future__ import annotations

from kvserve.model.loader import load_model

__all__ = ["load_model"]
