"""Text <-> token ids and chat-template rendering for the served model.

:class:`Tokenizer` wraps a fast ``tokenizers.Tokenizer`` and is built either from the
vocabulary stored in a GGUF file (:meth:`Tokenizer.from_gguf`: byte-level BPE with the pre-tokenizer
llama.cpp uses for the file's ``tokenizer.ggml.pre``, or SentencePiece BPE with byte fallback for Llama 2
and Mistral files: model/gguf_vocab.py) or from a
Hugging Face model folder (:meth:`Tokenizer.from_dir`, ``tokenizer.json`` + ``tokenizer_config.json``).
Chat templates are rendered as transformers renders them (model/chat_template.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

from kvserve.model.chat_template import compile_template, template_reads
from kvserve.model.gguf_metadata import GGUFMetadata, gguf_eos_token_ids, merge_token_ids, token_id_tuple
from kvserve.model.gguf_vocab import byte_level_inverse, gguf_backend
from kvserve.model.tool_format import native_messages, template_messages


class Tokenizer:
    """A fast tokenizer plus the model's special ids, BOS policy and chat template."""

    def __init__(
        self,
        backend: FastTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(eos_token_ids)
        self._chat_template = chat_template or None
        # BOS is prepended by hand only when the model asks for it and the backend's
        # post-processor does not already add it.
        self._prepend_bos = (
            add_bos_token and bos_token_id is not None and not _post_processor_adds(backend, bos_token_id)
        )

    # ----------------------------------------------------------------- constructors

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """Build from the ``tokenizer.*`` metadata of a ``gguf.GGUFReader``: byte-level BPE ("gpt2") or
        SentencePiece BPE ("llama"); any other ``tokenizer.ggml.model`` is refused by name."""
        meta = GGUFMetadata(reader)
        is_spm = meta.get("tokenizer.ggml.model") == "llama"
        return cls(
            gguf_backend(meta),
            bos_token_id=_as_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_ids=gguf_eos_token_ids(meta),
            # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", is_spm)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face model folder holding ``tokenizer.json``."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{folder} has no tokenizer.json (only fast tokenizers are supported)")
        backend = FastTokenizer.from_file(str(tokenizer_file))
        tok_config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        gen_config = _read_json(folder / "generation_config.json")
        bos_id = _special_id(backend, tok_config.get("bos_token"))
        if bos_id is None:
            bos_id = _as_int(model_config.get("bos_token_id"))
        eos_ids = merge_token_ids(
            _optional_tuple(_special_id(backend, tok_config.get("eos_token"))),
            token_id_tuple(model_config.get("eos_token_id")),
            token_id_tuple(gen_config.get("eos_token_id")),
        )
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos_token=bool(tok_config.get("add_bos_token", False)),
            chat_template=_dir_chat_template(folder, tok_config),
        )

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS policy applies."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The fast tokenizer as tokenizer.json text (for grammar engines that read it)."""
        return self._backend.to_str()

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Vocabulary strings (byte-level spelling) of ``ids``; None for an unknown id."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for, also when it is only part of a UTF-8 character (where decoding
        it alone gives U+FFFD): OpenAI's logprobs `bytes`. Byte-level BPE tokens map back through GPT-2's
        byte table, SentencePiece byte-fallback tokens (<0xE3>) are their byte; other tokens (special or
        added ones, SentencePiece pieces) are the UTF-8 of their decoded text."""
        token = self._backend.id_to_token(int(token_id))
        if token is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        if token is not None and self._byte_level and int(token_id) not in self._added_ids:
            table = byte_level_inverse()
            if all(ch in table for ch in token):
                return bytes(table[ch] for ch in token)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self._backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        return "ByteLevel" in kinds

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._backend.get_added_tokens_decoder())

    # ----------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does: ``tools`` and
        ``kwargs`` are template variables; ``continue_final_message`` cuts the text after the last message's
        content, so the model continues it instead of starting a new turn."""
        if self._chat_template is None:
            raise ValueError(
                "this model's tokenizer has no chat template, so chat messages cannot be formatted; "
                "send a plain completion prompt instead"
            )
        template = compile_template(self._chat_template)
        variables = {**kwargs, **self._template_tokens()}
        variables.setdefault("documents", None)
        text = template.render(
            messages=[dict(message) for message in messages],
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if continue_final_message:
            final = str(messages[-1].get("content") or "").strip()
            end = text.rfind(final) if final else -1
            if end < 0:
                raise ValueError("continue_final_message: the last message's content is not in the rendered chat")
            text = text[: end + len(final)]
        return text

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """A conversation as OpenAI sends it (dicts: tool_calls, tool messages, tools as function dicts) through
        the chat template: tools as the template takes them, or kvserve's default Hermes rendering when it has
        no tool support (kvserve/model/tool_format.py)."""
        if self.template_takes_tools:
            messages, template_tools = native_messages(messages), tools
        else:
            messages, template_tools = template_messages(messages, tools), None
        return self.apply_chat_template(
            messages,
            add_generation_prompt,
            tools=template_tools,
            continue_final_message=continue_final_message,
            **kwargs,
        )

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders tools itself (reads the `tools` variable)."""
        return self._chat_template is not None and template_reads(self._chat_template, "tools")

    def _template_tokens(self) -> dict[str, str]:
        tokens = {}
        if self._bos_token_id is not None:
            tokens["bos_token"] = self._backend.id_to_token(self._bos_token_id) or ""
        if self._eos_token_ids:
            tokens["eos_token"] = self._backend.id_to_token(self._eos_token_ids[0]) or ""
        return tokens

    # ----------------------------------------------------------------- properties

    @property
    def backend(self) -> FastTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of every special token (added special tokens, BOS and EOS)."""
        added = self._backend.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        special.update(self._eos_token_ids)
        if self._bos_token_id is not None:
            special.add(self._bos_token_id)
        return sorted(special)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template


# --------------------------------------------------------------------- HF folder helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _special_id(backend: FastTokenizer, token: Any) -> int | None:
    """Id of a special token given as a string or an ``{"content": ...}`` dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return backend.token_to_id(token)


def _dir_chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` (transformers 5) or ``tokenizer_config.json``'s ``chat_template``."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _post_processor_adds(backend: FastTokenizer, token_id: int) -> bool:
    """Whether encoding with special tokens already yields ``token_id`` (e.g. a BOS template)."""
    return token_id in backend.encode("", add_special_tokens=True).ids


def _as_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_tuple(value: int | None) -> tuple[int, ...]:
    return () if value is None else (value,)
