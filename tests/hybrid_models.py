"""Tiny random-weight hybrid checkpoints made with transformers' own classes, saved as Hugging Face folders.

No pretrained hybrid can be fetched here, so tests build these and load them into kvserve.
"""

from __future__ import annotations

from pathlib import Path

import transformers

from bench.golden_inputs import small_bamba_config


def bamba_config(**overrides) -> transformers.BambaConfig:
    """A small Bamba: attention at layer 1, the rest Mamba-2 mixers; SSD chunk 16 (prefill chunks cut it)."""
    return small_bamba_config(**overrides)


def save_with_tokenizer(model, tokenizer_dir: Path, out: Path) -> Path:
    """model.save_pretrained(out) plus the tokenizer files (not its config.json) from tokenizer_dir."""
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out
