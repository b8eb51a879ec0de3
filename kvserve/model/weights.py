"""Model weights read from their files on demand, and the two ways a model builder takes them.

A loaded model's ``weights`` map Hugging Face parameter names to tensors. For files on disk
(safetensors folders, GGUF) that map is a :class:`WeightFiles`: it holds only the files' index and
reads a tensor when asked, in the dtype it is stored in, so nothing is staged in float32 or kept
after the model is built. A model builder asks through :func:`take` and :func:`fuse`, which
allocate the engine-dtype tensor once and fill it from the file (converting as they copy), so
peak memory while loading is the model's own weights plus at most one source tensor. Plain dicts
of tensors (tests, synthetic models) work the same through both functions.

A ``WeightFiles`` can be read any number of times (a second engine on the same loaded model, the
KV tiers' fingerprint), each read costing disk or page-cache bandwidth instead of resident memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch


class WeightFiles(Mapping[str, torch.Tensor]):
    """Name -> tensor read from a file at each access (stored dtype); subclasses say how a tensor is read."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> None:
        self._shapes = shapes
        self._dtypes = dtypes

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding ``name`` in its stored dtype (dequantized to float32 if quantized)."""
        raise NotImplementedError

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (the right shape, any dtype and device) with ``name``; subclasses may skip the copy."""
        out.copy_(self.read(name).view(out.shape))

    def quantized(self, name: str) -> object | None:
        """``name`` as its file stores it, when that is a quantized type kvserve's kernel runs as stored
        (a kvserve.model.quant.QuantTensor); None otherwise (read it with read / read_into)."""
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape (Hugging Face layout), without reading it."""
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`read` returns for ``name``, without reading it."""
        return self._dtypes[name]

    def discard(self, name: str) -> None:
        """Forget ``name`` (e.g. an lm_head the config ties to the embedding); absent names are ignored."""
        self._shapes.pop(name, None)
        self._dtypes.pop(name, None)

    def nbytes(self) -> int:
        """Bytes of every tensor in its stored (read) dtype."""
        return sum(_numel(s) * self._dtypes[n].itemsize for n, s in self._shapes.items())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes


class SplitWeights(WeightFiles):
    """Weights whose fused tensors (Phi-3's qkv_proj, gate_up_proj) read as the parts every other family has:
    part name -> (fused name, first row, rows). A part read reads its fused tensor once and keeps its rows."""

    def __init__(self, base: WeightFiles, parts: dict[str, tuple[str, int, int]]) -> None:
        shapes = {n: base.shape(n) for n in base if not any(n == src for src, _, _ in parts.values())}
        dtypes = {n: base.dtype(n) for n in shapes}
        for name, (src, _, rows) in parts.items():
            shapes[name] = (rows, *base.shape(src)[1:])
            dtypes[name] = base.dtype(src)
        super().__init__(shapes, dtypes)
        self._base, self._parts = base, parts

    def read(self, name: str) -> torch.Tensor:
        if name in self._parts:
            src, row, rows = self._parts[name]
            return self._base.read(src)[row : row + rows].clone()
        return self._base.read(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        if name in self._parts:
            out.copy_(self.read(name).view(out.shape))
        else:
            self._base.read_into(name, out)


def split_fused(weights: WeightFiles, config: object) -> WeightFiles:
    """Phi-3's qkv_proj and gate_up_proj as the q/k/v and gate/up tensors every other family has (the model
    fuses them again its own way; transformers' Phi3MLP puts gate first); other families' weights as they are."""
    if getattr(config, "architecture", None) != "phi3":
        return weights
    q = config.num_attention_heads * config.head_dim  # type: ignore[attr-defined]
    kv = config.num_key_value_heads * config.head_dim  # type: ignore[attr-defined]
    parts: dict[str, tuple[str, int, int]] = {}
    for i in range(config.num_hidden_layers):  # type: ignore[attr-defined]
        p = f"model.layers.{i}."
        qkv, gate_up = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
        if qkv in weights:
            for name, row, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                parts[p + f"self_attn.{name}_proj.weight"] = (qkv, row, rows)
        if gate_up in weights:
            half = weights.shape(gate_up)[0] // 2
            parts[p + "mlp.gate_proj.weight"] = (gate_up, 0, half)
            parts[p + "mlp.up_proj.weight"] = (gate_up, half, half)
    return SplitWeights(weights, parts) if parts else weights


def weight_shape(weights: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """Shape of one weight, read without loading it where the weights are files."""
    if isinstance(weights, WeightFiles):
        return weights.shape(name)
    return tuple(weights[name].shape)


def take(weights: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``weights[name]`` as a contiguous tensor of ``dtype`` on ``device``, converted once from the file."""
    if not isinstance(weights, WeightFiles):
        return weights[name].to(device=device, dtype=dtype).contiguous()
    out = torch.empty(weights.shape(name), dtype=dtype, device=device)
    weights.read_into(name, out)
    return out


def fuse(
    weights: Mapping[str, torch.Tensor], names: Sequence[str], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The named tensors concatenated along dim 0 (fused q/k/v, gate/up) in ``dtype``: the fused tensor is
    allocated once and each part is read into its rows, so no part outlives its copy."""
    shapes = [weight_shape(weights, name) for name in names]
    if any(shape[1:] != shapes[0][1:] for shape in shapes):
        raise ValueError(f"cannot fuse {list(names)}: shapes {shapes} differ past the first dimension")
    out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype, device=device)
    row = 0
    for name, shape in zip(names, shapes):
        part = out[row : row + shape[0]]
        if isinstance(weights, WeightFiles):
            weights.read_into(name, part)
        else:
            part.copy_(weights[name])
        row += shape[0]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
