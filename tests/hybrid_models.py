"""Tiny random-weight hybrid checkpoints made with transformers' own classes, saved as Hugging Face folders.

No pretrained hybrid can be fetched here, so tests build these and load them into kvserve.
"""

from __future__ import annotations

from pathlib import Path

import transformers


def bamba_config(**overrides) -> transformers.BambaConfig:
    """A small Bamba: attention at layer 1, the rest Mamba-2 mixers; SSD chunk 16 (prefill chunks cut it)."""
    args = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
        max_position_embeddings=512,
    )
    return transformers.BambaConfig(**{**args, **overrides})


def save_with_tokenizer(model, tokenizer_dir: Path, out: Path) -> Path:
    """model.save_pretrained(out) plus the tokenizer files (not its config.json) from tokenizer_dir."""
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out
