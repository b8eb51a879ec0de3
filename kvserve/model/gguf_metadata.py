"""Reading a GGUF file's key/value metadata: the model's shape, rope scaling and special token ids."""

from __future__ import annotations

from typing import Any


class GGUFMetadata:
    """Read-only access to the key/value metadata of a ``gguf.GGUFReader``."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        """The decoded value stored under ``key`` (strings, numbers, lists), or ``default``."""
        field = self._fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str) -> Any:
        """Like :meth:`get`, but a missing key is a ``ValueError``."""
        if key not in self._fields:
            raise ValueError(f"GGUF metadata is missing required key {key!r}")
        return self.get(key)

    def array_length(self, key: str) -> int | None:
        """Number of elements of an array field, without decoding it."""
        field = self._fields.get(key)
        return None if field is None else len(field.data)


def token_id_tuple(value: Any) -> tuple[int, ...]:
    """Normalise an ``eos_token_id``-style value (None, int or list of ints) to a tuple."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def merge_token_ids(*groups: tuple[int, ...]) -> tuple[int, ...]:
    """Concatenate id tuples, dropping duplicates and keeping first-seen order."""
    return tuple(dict.fromkeys(i for group in groups for i in group))


def gguf_vocab_size(meta: GGUFMetadata, arch: str) -> int:
    size = meta.get(f"{arch}.vocab_size")
    if size is None:
        size = meta.array_length("tokenizer.ggml.tokens")
    if size is None:
        raise ValueError("GGUF metadata has neither a vocab_size nor tokenizer.ggml.tokens")
    return int(size)


def gguf_rope_scaling(meta: GGUFMetadata, arch: str) -> dict[str, Any] | None:
    """Translate llama.cpp's ``rope.scaling.*`` keys to a Hugging Face ``rope_scaling`` dict."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")
    if kind is None or kind == "none" or factor is None:
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = float(attn_factor)
    return scaling


def gguf_eos_token_ids(meta: GGUFMetadata) -> tuple[int, ...]:
    """End-of-generation ids a GGUF declares: eos, then end-of-turn and end-of-message if set."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return merge_token_ids(*(token_id_tuple(meta.get(key)) for key in keys))
