"""The Mamba-2 mixer in plain torch: chunked SSD for prefill, the single-step recurrence for decode.

Per sequence the mixer carries two pieces of state between steps:
    conv state  (C, K - 1)    the last K - 1 inputs of the causal depthwise conv (C = conv_dim channels)
    ssm state   (H, P, N)     h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, per head (float32)
and the output is y_t = C_t h_t + D x_t, then gated RMSNorm with silu(z) and out_proj.

A prefill chunk of n tokens runs the SSD ("state space duality") algorithm of Mamba-2: within each window of
chunk_size tokens the recurrence is a masked, decayed attention-like product; states pass between windows by
the recurrence itself. Starting it from a sequence's saved state and returning the final state makes
chunked prefill exact: splitting a prompt anywhere gives the same state as one pass, up to float rounding.
A decode token takes the recurrence one step. Numerics follow transformers' ``torch_forward`` of
``BambaMixer`` / ``Mamba2Mixer`` (float32 SSM math, dt clamped to time_step_limit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.model.config import MambaConfig
from kvserve.model.invariant import linear


@dataclass
class MixerWeights:
    in_proj: torch.Tensor  # (I + C + H, D): z (gate), xBC (conv input), dt
    in_proj_bias: torch.Tensor | None
    conv_weight: torch.Tensor  # (C, 1, K) depthwise
    conv_bias: torch.Tensor | None  # (C,)
    dt_bias: torch.Tensor  # (H,) float32
    A: torch.Tensor  # (H,) float32, = -exp(A_log)
    D: torch.Tensor  # (H,) float32
    norm: torch.Tensor  # (I,) gated RMSNorm weight
    out_proj: torch.Tensor  # (D, I)
    out_proj_bias: torch.Tensor | None


@dataclass
class MixerStates:
    """Initial states of the sequences of one step, in row order [decodes ..., prefill chunks ...]."""

    conv: torch.Tensor  # (S, C, K - 1) model dtype
    ssm: torch.Tensor  # (S, H, P, N) float32


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """x (..., L) -> (..., L, L): out[i, j] = sum(x[j+1 .. i]) for j <= i, -inf above the diagonal."""
    L = x.size(-1)
    x = x[..., None].expand(*x.size(), L)
    x = x.masked_fill(~torch.tril(torch.ones(L, L, device=x.device, dtype=torch.bool), diagonal=-1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(L, L, device=x.device, dtype=torch.bool), diagonal=0), -torch.inf)


def ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's n tokens through the SSM from state h0, all float32.

    x (n, H, P), dt (n, H) (after softplus and clamp), A (H,), B/C (n, H, N) (groups already repeated to heads),
    h0 (H, P, N) -> y (n, H, P) without the D skip, final state (H, P, N).
    """
    n, H, P = x.shape
    chunk = min(chunk, n)  # a short prefill chunk needs no padding to a full window (same math)
    pad = (chunk - n % chunk) % chunk
    nc = (n + pad) // chunk

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (n, ...) -> (nc, chunk, ...), zero padded at the end
        return F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)).reshape(nc, chunk, *t.shape[1:])

    xs = chunks(x * dt[..., None])  # (c, l, H, P): discretised input
    Ac = chunks(A[None, :] * dt).permute(2, 0, 1)  # (H, c, l)
    Bs, Cs = chunks(B), chunks(C)  # (c, l, H, N)
    A_cumsum = torch.cumsum(Ac, dim=-1)  # (H, c, l)
    # 1. within each chunk: (c, l, s, H) decayed C.B products applied to the inputs
    Lmat = torch.exp(_segment_sum(Ac))  # (H, c, l, s)
    G = torch.einsum("clhn,cshn->clsh", Cs, Bs)
    y_diag = torch.einsum("clsh,cshp->clhp", G * Lmat.permute(1, 2, 3, 0), xs)
    # 2. each chunk's own contribution to the state at its end
    decay_states = torch.exp(A_cumsum[:, :, -1:] - A_cumsum)  # (H, c, l)
    states = torch.einsum("clhn,clhp->chpn", Bs * decay_states.permute(1, 2, 0)[..., None], xs)
    # 3. states at chunk starts: the recurrence across chunks, from h0
    states = torch.cat([h0[None], states], dim=0)  # (c + 1, H, P, N)
    decay_chunk = torch.exp(_segment_sum(F.pad(A_cumsum[:, :, -1], (1, 0)))).permute(1, 2, 0)  # (c+1, c+1, H)
    new_states = torch.einsum("zch,chpn->zhpn", decay_chunk, states)
    states, final = new_states[:-1], new_states[-1]
    # 4. contribution of each chunk's start state to its outputs
    y_off = torch.einsum("clhn,chpn->clhp", Cs, states) * torch.exp(A_cumsum).permute(1, 2, 0)[..., None]
    y = (y_diag + y_off).reshape(nc * chunk, H, P)[:n]
    return y, final


def ssm_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of S sequences, float32: state (S, H, P, N), x (S, H, P), dt (S, H), B/C (S, H, N).

    -> y (S, H, P) without the D skip, new state.
    """
    dA = torch.exp(dt * A[None, :])[..., None, None]  # (S, H, 1, 1)
    new = state * dA + (dt[..., None, None] * B[:, :, None, :]) * x[..., None]
    y = torch.einsum("shpn,shn->shp", new, C)
    return y, new


def _dt(dt: torch.Tensor, w: MixerWeights, cfg: MambaConfig) -> torch.Tensor:
    lo, hi = cfg.time_step_limit
    return F.softplus(dt.float() + w.dt_bias).clamp(min=lo, max=hi)


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """y, gate (T, I) -> (T, I) in weight's dtype: RMSNorm of y * silu(gate) over I / groups channels each."""
    h = y.float() * F.silu(gate.float())
    T, width = h.shape
    hg = h.view(T, groups, width // groups)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hg.view(T, width).to(weight.dtype)


def mamba_mixer(
    h: torch.Tensor,
    w: MixerWeights,
    cfg: MambaConfig,
    num_decodes: int,
    prefills: list[tuple[int, int]],
    states: MixerStates,
) -> tuple[torch.Tensor, MixerStates]:
    """h (T, D) normed hidden states of the flat batch -> (out (T, D), the states after this step).

    Rows [0, num_decodes) are one decode token each (sequence i = row i); prefills lists (row_start, n) of
    each following chunk (sequence num_decodes + k). states holds every sequence's state before the step.
    """
    T = h.shape[0]
    H, P, N, G, K = cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.num_groups, cfg.conv_kernel
    inner, Cd = cfg.intermediate_size, cfg.conv_dim
    zxbcdt = linear(h, w.in_proj, w.in_proj_bias)  # (T, I + C + H)
    gate, xbc, dt_raw = zxbcdt.split([inner, Cd, H], dim=-1)
    dt = _dt(dt_raw, w, cfg)  # (T, H) float32
    y = torch.empty(T, H, P, dtype=torch.float32, device=h.device)
    conv_new = torch.empty_like(states.conv)
    ssm_new = torch.empty_like(states.ssm)
    x_all = torch.empty(T, Cd, dtype=h.dtype, device=h.device)  # conv outputs (after silu)

    if num_decodes:
        window = torch.cat([states.conv[:num_decodes], xbc[:num_decodes, :, None]], dim=-1)  # (S, C, K)
        conv_new[:num_decodes] = window[:, :, 1:]
        x_all[:num_decodes] = F.silu(F.conv1d(window, w.conv_weight, w.conv_bias, groups=Cd)[:, :, 0])
    for k, (r, n) in enumerate(prefills):
        seq = torch.cat([states.conv[num_decodes + k], xbc[r : r + n].T], dim=-1)  # (C, K - 1 + n)
        conv_new[num_decodes + k] = seq[:, seq.shape[1] - (K - 1) :]
        x_all[r : r + n] = F.silu(F.conv1d(seq[None], w.conv_weight, w.conv_bias, groups=Cd)[0].T)

    x, B, C = x_all.float().split([inner, G * N, G * N], dim=-1)
    x = x.view(T, H, P)
    B = B.view(T, G, N).repeat_interleave(H // G, dim=1)  # (T, H, N)
    C = C.view(T, G, N).repeat_interleave(H // G, dim=1)
    if num_decodes:
        d = slice(0, num_decodes)
        y[d], ssm_new[:num_decodes] = ssm_step(states.ssm[:num_decodes], x[d], dt[d], w.A, B[d], C[d])
    for k, (r, n) in enumerate(prefills):
        s = slice(r, r + n)
        y[s], ssm_new[num_decodes + k] = ssd_scan(
            x[s], dt[s], w.A, B[s], C[s], cfg.chunk_size, states.ssm[num_decodes + k]
        )
    y = y + x * w.D[:, None]
    out = gated_rms_norm(y.view(T, inner), gate, w.norm, G, cfg.norm_eps)
    return linear(out, w.out_proj, w.out_proj_bias), MixerStates(conv_new, ssm_new)
