"""A GGUF file's vocabulary as a fast byte-level BPE tokenizer, split the way llama.cpp splits text for the
file's `tokenizer.ggml.pre` (llm_tokenizer_bpe in llama-vocab.cpp)."""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

# llama.cpp's BPE pre-tokenizer regexes (llm_tokenizer_bpe in llama-vocab.cpp). Each regex
# in a list further splits the pieces of the previous one, keeping unmatched text as pieces.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2_SPLIT)

_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), (_QWEN2_SPLIT,)),
}
# Pre-tokenizers whose tokenizer.json sets BPE ignore_merges (whole-word vocabulary hits win).
_IGNORE_MERGES = frozenset(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe"))

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> FastTokenizer:
    """A byte-level BPE tokenizer over ``tokens``/``merges`` split like llama.cpp's ``pre``."""
    splits = _PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(sorted(_PRE_TOKENIZER_SPLITS))}"
        )
    spelled = _byte_level_spelling()
    vocab = {_respell(token, spelled): index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=pre in _IGNORE_MERGES,
    )
    backend = FastTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


@functools.lru_cache(maxsize=1)
def _byte_level_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _respell(token: str, spelled: dict[int, str]) -> str:
    """A token written in raw text (a llama.cpp quirk for some files) respelled in byte-level form."""
    alphabet = _byte_level_alphabet()
    if all(ch in alphabet for ch in token):
        return token
    return "".join(spelled[byte] for byte in token.encode("utf-8"))


@functools.lru_cache(maxsize=1)
def byte_level_inverse() -> dict[str, int]:
    return {ch: byte for byte, ch in _byte_level_spelling().items()}


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> frozenset[str]:
    return frozenset(_byte_level_spelling().values())


def register_added_tokens(backend: FastTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens."""
    if not token_types:  # a file without token types marks nothing special
        return
    alphabet = _byte_level_alphabet()
    control, user = [], []
    for token, kind in zip(tokens, token_types, strict=True):
        if kind == _TOKEN_TYPE_CONTROL and all(ch in alphabet for ch in token):
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _TOKEN_TYPE_USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
