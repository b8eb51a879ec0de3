"""Token sampling from logits: greedy, temperature, top-k, top-p, min-p, logprobs.

Random choices are Gumbel-max with noise keyed by (seed, position): the token at position p of a request with
seed s is argmax(log(filtered probs) + G(s, p)), G a fixed function of (s, p), computed in its equivalent form
argmax(filtered probs / E(s, p)) with E = exp(-G) standard exponential noise. That is an exact draw from the
filtered distribution, reproducible whatever else shares the batch, and the same whether the token is sampled
alone or while verifying speculative drafts (the verifier reproduces the draw plain decoding makes). Requests
without a seed get one from the engine. Logprobs are those of the model's raw distribution (before
temperature / top-k / top-p), as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvserve.model import native
from kvserve.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # of the chosen token, when asked for
    top_logprobs: dict[int, float] | None  # the k most likely tokens, when logprobs = k > 0


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: (V,) float32 -> probabilities after temperature, top-k, top-p and min-p (as vLLM orders them:
    min-p keeps the tokens at least min_p times as likely as the most likely one left)."""
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        logits = _top_p(logits, p.top_p)
    probs = logits.softmax(-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


_MASK64 = (1 << 64) - 1


def noise_key(seed: int, position: int) -> int:
    """A 63-bit generator seed from (seed, position): splitmix64's finaliser over both, so nearby seeds and
    positions give unrelated noise."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def exponential_noise(seed: int, position: int, size: int, device: torch.device) -> torch.Tensor:
    """E(seed, position): standard exponential noise of `size` entries, drawn on the CPU (the same on every
    device)."""
    gen = torch.Generator().manual_seed(noise_key(seed, position))
    return (
        torch.rand(size, generator=gen, dtype=torch.float32).log_().neg_().to(device)
    )  # -log(U), 6x faster than exponential_


TOP_P_CANDIDATES = 256  # top-p looks at the most likely tokens first; a full sort only when its cut lies beyond


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop tokens once the mass before them (most likely first) already reaches top_p; the first token always
    stays, also for a top_p that is 0 in float32. Only the TOP_P_CANDIDATES most likely are sorted (topk)
    unless the cut falls below them: 3.4 ms -> 0.3 ms a row at 49,152 tokens."""
    probs = logits.softmax(-1)
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    top, order = torch.topk(probs, k)
    before = top.cumsum(-1) - top
    if k < logits.shape[-1] and before[-1] < top_p:  # the cut lies further down: sort everything
        top, order = torch.sort(probs, descending=True)
        before = top.cumsum(-1) - top
    keep = before < top_p
    keep[0] = True
    kept = order[keep]
    return torch.full_like(logits, float("-inf")).index_copy_(0, kept, logits[kept])


def _bias_tensors(p: SamplingParams, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logit_bias as (ids, values) tensors, built once per SamplingParams and device (not on every step)."""
    cache = p.__dict__.setdefault("_bias_tensors", {})  # a frozen dataclass: a private memo beside the fields
    key = (device, dtype)
    if key not in cache:
        bias = p.logit_bias or {}
        cache[key] = (
            torch.tensor(list(bias), dtype=torch.long, device=device),
            torch.tensor(list(bias.values()), dtype=dtype, device=device),
        )
    return cache[key]


def _adjust(row: torch.Tensor, p: SamplingParams, prompt: torch.Tensor | None, output: list[int]) -> None:
    """Row i's logit bias and penalties, in place, in vLLM's order (sampling_params.py). prompt: the distinct
    prompt ids (for the repetition penalty)."""
    dev = row.device
    if p.logit_bias:
        ids, values = _bias_tensors(p, dev, row.dtype)
        row.index_add_(0, ids, values)
    if p.repetition_penalty != 1.0:
        assert prompt is not None
        seen = torch.cat([prompt, torch.tensor(output, dtype=torch.long, device=dev)]) if output else prompt
        values = row[seen]  # an id twice (prompt and output) reads the same value and writes the same result
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if output and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=row.shape[0])
        counts = counts[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    keys: list[tuple[int, int] | None],
    banned: list[list[int]] | None = None,
    histories: list[tuple[torch.Tensor | None, Sequence[int]]] | None = None,
    allowed: list[torch.Tensor | None] | None = None,
) -> list[SampleResult]:
    """logits: (S, V) float32, one row per token to sample. keys[i]: (seed, position) of row i's random choice
    (None for greedy rows). banned[i]: token ids row i may not pick (EOS and stop tokens before min_tokens).
    histories[i]: row i's (distinct prompt ids, output ids), for its penalties. allowed[i]: a bool mask of the
    tokens row i may pick (structured outputs), or None. The choice sees the adjusted logits; logprobs stay
    those of the raw logits (vLLM's default)."""
    choice = logits
    adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
    masked = [i for i, m in enumerate(allowed or ()) if m is not None]
    if adjusted or masked or (banned is not None and any(banned)):
        choice = logits.clone()
    for i in masked:
        assert allowed is not None
        choice[i].masked_fill_(~allowed[i].to(choice.device), float("-inf"))
    for i in adjusted:
        if histories is None:
            raise ValueError("a request with penalties or a logit bias needs its token history")
        _adjust(choice[i], params[i], *histories[i])
    if banned is not None:
        for i, ids in enumerate(banned):
            if ids:
                choice[i, ids] = float("-inf")
    greedy_ids = native.argmax_rows(choice)  # the same indices, rows in parallel
    if greedy_ids is None:
        greedy_ids = choice.argmax(dim=-1).tolist()
    need_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            token = greedy_ids[i]
        else:
            key = keys[i]
            assert key is not None, "a sampled row needs its (seed, position)"
            probs = _filtered_probs(choice[i], p)
            token = int(torch.argmax(probs / exponential_noise(*key, probs.shape[-1], probs.device)).item())
        lp, top = None, None
        if logprobs is not None and p.logprobs is not None:
            lp = float(logprobs[i, token])
            if p.logprobs > 0:
                values, ids = torch.topk(logprobs[i], p.logprobs)
                top = dict(zip(ids.tolist(), values.tolist()))
        out.append(SampleResult(token, lp, top))
    return out
