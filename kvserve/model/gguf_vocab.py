"""A GGUF file's vocabulary as a fast tokenizer: byte-level BPE (`tokenizer.ggml.model` "gpt2"), split the way
llama.cpp splits text for the file's `tokenizer.ggml.pre` (llm_tokenizer_bpe in llama-vocab.cpp), or
SentencePiece BPE ("llama": Llama 2, Mistral), rebuilt from the pieces' scores (llm_tokenizer_spm)."""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from kvserve.model.gguf_metadata import GGUFMetadata

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

_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_SPACE = "\u2581"  # SentencePiece's visible space


_TOKENIZER_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}  # tokenizer.ggml.model values


def gguf_backend(meta: GGUFMetadata) -> FastTokenizer:
    """The fast tokenizer a GGUF's ``tokenizer.ggml.*`` metadata describes, its control and user-defined
    tokens added; a ``tokenizer.ggml.model`` other than "gpt2" or "llama" is refused by name."""
    model_type = meta.get("tokenizer.ggml.model")
    if model_type not in _TOKENIZER_MODELS:
        raise ValueError(
            f"unsupported GGUF tokenizer model {model_type!r} (tokenizer.ggml.model); supported: "
            + ", ".join(f"{name!r} ({what})" for name, what in _TOKENIZER_MODELS.items())
        )
    tokens = meta.require("tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type") or []
    if model_type == "gpt2":
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        backend = byte_level_bpe(tokens, meta.require("tokenizer.ggml.merges"), pre)
    else:
        scores = meta.require("tokenizer.ggml.scores")
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend = sentencepiece_bpe(tokens, scores, token_types, prefix)
    register_added_tokens(backend, tokens, token_types, byte_level=model_type == "gpt2")
    return backend


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


def sentencepiece_bpe(
    tokens: list[str], scores: list[float], token_types: list[int], add_space_prefix: bool = True
) -> FastTokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become "▁" (one prepended to the text), then the
    adjacent pair whose join is the best-scoring vocabulary piece merges first, and what no piece covers
    falls back to <0xXX> byte tokens. A GGUF stores pieces and scores but no merges; the merges are every
    split of a piece into two pieces, ranked by the joined piece's score (ties: longer left part first, as
    transformers' GGUF converter ranks them), which makes ``tokenizers``' BPE pick the same pair each step.
    """
    if len(scores) != len(tokens):
        raise ValueError(f"GGUF SentencePiece vocabulary has {len(tokens)} tokens but {len(scores)} scores")
    vocab = {token: index for index, token in enumerate(tokens)}
    mergeable = [kind in (_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_USER_DEFINED) for kind in token_types] or [True] * len(tokens)
    ranked = []
    for token, score, ok in zip(tokens, scores, mergeable):
        if ok and len(token) > 1:
            ranked += [
                (-score, -i, token[:i], token[i:])
                for i in range(1, len(token))
                if token[:i] in vocab and token[i:] in vocab
            ]
    ranked.sort()
    unknown = next((tokens[i] for i, kind in enumerate(token_types) if kind == _TOKEN_TYPE_UNKNOWN), None)
    bpe = models.BPE(
        vocab=vocab,
        merges=[(left, right) for _, _, left, right in ranked],
        unk_token=unknown,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = FastTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
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


def register_added_tokens(
    backend: FastTokenizer, tokens: list[str], token_types: list[int], byte_level: bool = True
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens. In a byte-level
    vocabulary a control token spelled outside the byte alphabet is a llama.cpp mislabel and is skipped."""
    if not token_types:  # a file without token types marks nothing special
        return
    alphabet = _byte_level_alphabet()
    control, user = [], []
    for token, kind in zip(tokens, token_types, strict=True):
        if kind == _TOKEN_TYPE_CONTROL and (not byte_level or all(ch in alphabet for ch in token)):
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _TOKEN_TYPE_USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
