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
