"""Unfused PyTorch implementations: the single oracle for every test and the CPU fallback.

Everything here is plain autograd-differentiable PyTorch and works in any floating dtype, float64 included.
The mask arguments are the canonical forms of :mod:`fastattn.masks`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["alibi_slopes", "attention", "attention_varlen", "attention_varlen_padded", "diagonal", "visible_keys",
           "softmax", "layer_norm", "add_layer_norm"]


def diagonal(B: int, Lq: int, Lk: int, *, device, bottom_right: bool = False,
             kv_lens: Optional[Tensor] = None, q_start: int = 0, q_total: Optional[int] = None) -> Tensor:
    """d(i) as a long tensor [B, 1, Lq, 1]: i (top-left) or i + Lk_b − Lq (bottom-right), Lk_b = kv_lens[b] or Lk.
    q_start / q_total: the Lq queries are rows q_start, q_start + 1, ... of q_total (default Lq), i counted so;
    Lk: all the keys (k_total of ``attention``)."""
    i = torch.arange(q_start, q_start + Lq, device=device).view(1, 1, Lq, 1)
    if not bottom_right:
        return i.expand(B, 1, Lq, 1)
    lk = kv_lens.to(device=device, dtype=torch.long) if kv_lens is not None else torch.full((B,), Lk, device=device)
    return i + (lk - (Lq if q_total is None else q_total)).view(B, 1, 1, 1)


def visible_keys(
    B: int,
    Lq: int,
    Lk: int,
    *,
    device: torch.device,
    causal: bool = False,
    bottom_right: bool = False,
    attn_mask: Optional[Tensor] = None,
    kv_lens: Optional[Tensor] = None,
    window_size: tuple[int, int] = (-1, -1),
    q_start: int = 0,
    q_total: Optional[int] = None,
    k_start: int = 0,
    k_total: Optional[int] = None,
) -> Optional[Tensor]:
    """Bool [B|1, H|1, Lq, Lk]: True where query i may attend to key j (None = everything visible).

    kv_lens[b] keys are valid (right padding). With d(i) the diagonal (see ``diagonal``) and
    window_size = (left, right), −1 = unbounded: j visible iff d(i) − left <= j <= d(i) + right; causal sets
    right = 0. q_start, q_total, k_start, k_total as for ``attention``.
    """
    vis = None
    j = torch.arange(k_start, k_start + Lk, device=device).view(1, 1, 1, Lk)
    if kv_lens is not None:
        vis = j < kv_lens.to(device=device, dtype=torch.long).view(B, 1, 1, 1)
    left, right = window_size
    if causal:
        right = 0
    if left >= 0 or right >= 0:
        d = diagonal(B, Lq, Lk if k_total is None else k_total, device=device, bottom_right=bottom_right,
                     kv_lens=kv_lens, q_start=q_start, q_total=q_total)
        w = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
        if right >= 0:
            w &= j <= d + right
        if left >= 0:
            w &= j >= d - left
        vis = w if vis is None else vis & w
    if attn_mask is not None:
        vis = attn_mask if vis is None else vis & attn_mask
    return vis


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    bottom_right: bool = False,
    attn_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    kv_lens: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    q_start: int = 0,
    q_total: Optional[int] = None,
    k_start: int = 0,
    k_total: Optional[int] = None,
):
    """out = dropout(softmax(q·kᵀ·scale + bias, masked)) · v, in q's dtype.

    q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (GQA: query head h reads kv head h // (H/Hkv)).
    attn_mask: bool, broadcastable to [B, H, Lq, Lk], True = attend. attn_bias: float, same broadcast, added.
    dropout_mask: bool keep-mask [B, H, Lq, Lk]; kept weights are scaled by 1/(1 - dropout_p).
    window_size (left, right): local attention around the diagonal d(i) (see ``visible_keys``).
    softcap c > 0: the scaled score s becomes c·tanh(s/c) before bias, ALiBi and masks.
    alibi_slopes: [H] or [B, H]; adds −slope·|d(i) − j| to the scores.
    sinks: [H], one more score per row of head h (after every mask, always visible) that has no value: the
    softmax runs over [s_i0 .. s_i(Lk−1), sinks[h]] and the sink's weight is dropped (GPT-OSS's learnable sinks).
    A row with no visible key gives 0 (its LSE is +inf, or sinks[h] with sinks). LSE (natural log, float32) of the scaled,
    biased, masked scores before dropout is returned with return_lse=True.
    q_start / q_total, k_start / k_total: q holds rows q_start, q_start + 1, ... of q_total (default Lq), k and v
    keys k_start, ... of k_total (default Lk), as the diagonal, kv_lens and ALiBi count them (masks, bias and
    dropout_mask cover these rows and keys only): a part of a longer call, the same where it holds every key its
    rows see.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    if alibi_slopes is not None:
        d = diagonal(B, Lq, Lk if k_total is None else k_total, device=q.device, bottom_right=bottom_right,
                     kv_lens=kv_lens, q_start=q_start, q_total=q_total)
        dist = (d - torch.arange(k_start, k_start + Lk, device=q.device).view(1, 1, 1, Lk)).abs().to(s.dtype)
        slopes = alibi_slopes.to(s.dtype).view(-1, H, 1, 1)
        s = s - slopes * dist
    vis = visible_keys(B, Lq, Lk, device=q.device, causal=causal, bottom_right=bottom_right,
                       attn_mask=attn_mask, kv_lens=kv_lens, window_size=window_size, q_start=q_start,
                       q_total=q_total, k_start=k_start, k_total=k_total)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, H, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    # A row with nothing visible (masks, or a bias of -inf) gives 0, never NaN.
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    s_safe = s.masked_fill(empty, 0.0)
    p = torch.softmax(s_safe, dim=-1).masked_fill(empty, 0.0)
    if sinks is not None:
        p = p[..., :Lk]
    if dropout_mask is not None and dropout_p > 0.0:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, v)
    if not return_lse:
        return out
    # logsumexp of s_safe, not s: an all -inf row would give a NaN gradient even behind masked_fill.
    lse = torch.logsumexp(s_safe.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    lse = lse.masked_fill(empty.squeeze(-1), float("inf"))
    return out, lse


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                     dropout_mask: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                     return_lse: bool = False, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, attend=None, **kwargs):
    """:func:`attention` on a packed batch, one sequence at a time: q [total_q, H, D], k/v [total_k, Hkv, D],
    sequence b in rows cu[b] .. cu[b+1]. dropout_mask: [B, H, ≥Lq_b, ≥Lk_b], sequence b uses the top-left
    corner of mask[b]; alibi_slopes [H] or [B, H]. Returns out [total_q, H, D] (and lse [H, total_q]).
    Under torch.compile, given max_seqlen_q/k, the same as one padded batch (:func:`attention_varlen_padded`):
    the loop's lengths are data, which a whole-graph trace cannot take. ``attend`` replaces :func:`attention` for
    each sequence (same arguments; the "torch" backend's row-chunked form)."""
    if torch.compiler.is_compiling() and max_seqlen_q is not None and max_seqlen_k is not None:
        return attention_varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       dropout_mask=dropout_mask, alibi_slopes=alibi_slopes, return_lse=return_lse,
                                       **kwargs)
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        keep = None
        if dropout_mask is not None:
            keep = dropout_mask[b:b + 1, :, :qb.shape[2], :kb.shape[2]]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.reshape(-1, q.shape[1])
            slopes = slopes[b:b + 1] if slopes.shape[0] > 1 else slopes
        res = (attend or attention)(qb, kb, vb, dropout_mask=keep, alibi_slopes=slopes, return_lse=return_lse,
                                    **kwargs)
        out, lse = res if return_lse else (res, None)
        outs.append(out[0].transpose(0, 1))
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs, dim=0) if outs else q.new_empty((0, q.shape[1], v.shape[2]))
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def attention_varlen_padded(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, *, bottom_right: bool = False,
                            dropout_mask: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                            return_lse: bool = False, **kwargs):
    """:func:`attention_varlen` with no shape that depends on the data: the sequences gathered into one padded
    batch (keys at the start, with kv_lens; queries at the start, or for bottom-right at the end, so that
    :func:`attention`'s own diagonal is each sequence's d(i) = i + Lk_b − Lq_b), then the rows gathered back."""
    B, H, total_q = cu_seqlens_q.shape[0] - 1, q.shape[1], q.shape[0]
    if total_q == 0 or k.shape[0] == 0:  # nothing to gather from: the loop's answer (zeros), static shapes
        return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, bottom_right=bottom_right,
                                dropout_mask=dropout_mask, alibi_slopes=alibi_slopes, return_lse=return_lse,
                                **kwargs)
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    shift = (max_seqlen_q - len_q) if bottom_right else torch.zeros_like(len_q)  # padded row of query i: i + shift
    rows, cols = torch.arange(max_seqlen_q, device=q.device), torch.arange(max_seqlen_k, device=q.device)
    src_q = (cu_q[:-1, None] + rows - shift[:, None]).clamp(0, total_q - 1)  # padding rows read any real row
    src_k = (cu_k[:-1, None] + cols).clamp(0, k.shape[0] - 1)
    qp, kp, vp = (t[idx].transpose(1, 2) for t, idx in ((q, src_q), (k, src_k), (v, src_k)))
    keep = None
    if dropout_mask is not None:  # sequence b's mask sits in the top-left corner of mask[b]
        src = (rows - shift[:, None]).clamp(0, max_seqlen_q - 1)
        keep = torch.gather(dropout_mask[:, :, :max_seqlen_q, :max_seqlen_k], 2,
                            src.view(B, 1, max_seqlen_q, 1).expand(B, H, max_seqlen_q, max_seqlen_k))
    slopes = alibi_slopes.reshape(-1, H) if alibi_slopes is not None else None
    res = attention(qp, kp, vp, kv_lens=len_k, bottom_right=bottom_right, dropout_mask=keep, alibi_slopes=slopes,
                    return_lse=return_lse, **kwargs)
    out, lse = res if return_lse else (res, None)
    t = torch.arange(total_q, device=q.device)
    b = torch.searchsorted(cu_q[1:].contiguous(), t, right=True)
    p = t - cu_q[b] + shift[b]
    return (out[b, :, p], lse[b, :, p].transpose(0, 1)) if return_lse else out[b, :, p]


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's geometric slopes (Press et al.): for n = 2^k heads, 2^(−8i/n), i = 1..n; otherwise those of the
    closest smaller power of two followed by every other slope of the next power of two. float32 [num_heads]."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")

    def power_of_two(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def softmax(x: Tensor, dim: int = -1, *, dtype: Optional[torch.dtype] = None, scale: float = 1.0,
            mask: Optional[Tensor] = None) -> Tensor:
    """softmax(x·scale + mask) along ``dim``, computed in ``dtype`` (default x's); a row of −inf gives 0."""
    z = x.to(dtype) if dtype is not None else x
    if scale != 1.0:
        z = z * scale
    if mask is not None:
        z = z + mask.to(z.dtype)
    empty = (z == float("-inf")).all(dim=dim, keepdim=True)
    return torch.softmax(z.masked_fill(empty, 0.0), dim=dim).masked_fill(empty, 0.0)


def layer_norm(x: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """(x − mean) / sqrt(var + eps) · weight + bias over the trailing ``normalized_shape`` dims (biased var)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = x.mean(dim=dims, keepdim=True)
    xc = x - mean
    y = xc / torch.sqrt((xc * xc).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, prenorm: bool = False):
    """LayerNorm(x + residual); with ``prenorm`` also returns the sum x + residual."""
    s = x + residual
    y = layer_norm(s, normalized_shape, weight, bias, eps)
    return (y, s) if prenorm else y
