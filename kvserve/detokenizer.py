"""Incremental detokenization and stop strings.

Decoding the whole output every step is O(n^2); instead we keep two offsets into the output ids
  [prefix_offset, read_offset)   tokens already turned into text, decoded again only for context
  [read_offset, len)             new tokens
and emit the text that the new tokens add, holding back an incomplete UTF-8 sequence ("\ufffd") until the
next token completes it. Stop strings are searched in the text added plus enough of the old text to catch
a stop string that straddles the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.model.tokenizer import Tokenizer

PROMPT_CONTEXT = 5  # prompt tokens the first output token is decoded after (as vLLM does)


@dataclass
class DetokenizerState:
    skip_special_tokens: bool = True
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    ids: list[int] = field(default_factory=list)

    @classmethod
    def after_prompt(cls, prompt_ids: list[int], skip_special_tokens: bool = True) -> DetokenizerState:
        """A state whose first output token is decoded after the prompt's last tokens, not alone: tokenizers
        whose decoder strips a leading space at the start of a text (SentencePiece's "▁world") would
        otherwise drop the space of the first generated word."""
        tail = list(prompt_ids[-PROMPT_CONTEXT:])
        return cls(skip_special_tokens, prefix_offset=0, read_offset=len(tail), ids=tail)


def add_token(tokenizer: Tokenizer, state: DetokenizerState, token_id: int) -> str:
    """Append one token; returns the text it completes (possibly empty)."""
    state.ids.append(token_id)
    skip = state.skip_special_tokens
    prefix_text = tokenizer.decode(state.ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip)
    full_text = tokenizer.decode(state.ids[state.prefix_offset :], skip_special_tokens=skip)
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        new_text = full_text[len(prefix_text) :]
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.ids)
        state.text += new_text
        return new_text
    return ""


def find_stop(text: str, new_len: int, stops: tuple[str, ...]) -> tuple[str, int] | None:
    """The first stop string that ends inside the last new_len characters of text: (stop, start index)."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
        if start != -1 and (best is None or start < best[1]):
            best = (stop, start)
    return best
