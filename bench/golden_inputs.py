"""The golden inputs: the prompts, document and small hybrid model that tests/model/test_golden.py,
tests/hybrid_models.py and bench/cuda_check.py all use (tests import them from here; bench/ never imports
tests/), so the CUDA check's numbers speak of the same prompts and model shapes as the CPU tests.
"""

from __future__ import annotations

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
    "Translate to French: 'Good morning, how are you?'\n",
    "1, 1, 2, 3, 5, 8, 13,",
    "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nDescribe the ocean.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "import numpy as np\n\n# compute the mean of a list\ndef mean(xs):",
    "Photosynthesis is the process by which",
]
DOC = (
    "Kvserve keeps the key and value tensors of every full block of sixteen tokens in a pool, addressed by a "
    "hash chain over the tokens. A request that shares its first tokens with earlier traffic loads them and "
    "computes only the rest. The pool evicts the least recently used block when it runs out of space, and a "
    "block is never evicted while a running request references it. "
) * 3

SMALL_BAMBA = dict(  # attention at layer 1, the rest Mamba-2 mixers; SSD chunk 16 (prefill chunks cut it)
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


def small_bamba_config(**overrides):
    """transformers.BambaConfig of the tests' small Bamba, with overrides."""
    import transformers

    return transformers.BambaConfig(**{**SMALL_BAMBA, **overrides})
