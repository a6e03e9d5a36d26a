"""Unfused PyTorch implementations: the single oracle for every test and the CPU fallback.

Everything here is plain autograd-differentiable PyTorch and works in any floating dtype, float64 included.
The mask arguments are the canonical forms of :mod:`fastattn.masks`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["attention", "visible_keys", "softmax", "layer_norm", "add_layer_norm"]


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
) -> Optional[Tensor]:
    """Bool [B|1, H|1, Lq, Lk]: True where query i may attend to key j (None = everything visible).

    kv_lens[b] keys are valid (right padding). Causal: j <= d(i) with d(i) = i (top-left) or
    i + Lk_b - Lq (bottom-right), where Lk_b is kv_lens[b] when given and Lk otherwise.
    """
    vis = None
    j = torch.arange(Lk, device=device)
    if kv_lens is not None:
        vis = j.view(1, 1, 1, Lk) < kv_lens.to(device=device, dtype=torch.long).view(B, 1, 1, 1)
    if causal:
        i = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
        shift = torch.zeros(B, 1, 1, 1, dtype=torch.long, device=device)
        if bottom_right:
            lk = kv_lens.to(device=device, dtype=torch.long) if kv_lens is not None else torch.full((B,), Lk, device=device)
            shift = (lk - Lq).view(B, 1, 1, 1)
        c = j.view(1, 1, 1, Lk) <= i + shift
        vis = c if vis is None else vis & c
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
):
    """out = dropout(softmax(q·kᵀ·scale + bias, masked)) · v, in q's dtype.

    q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (GQA: query head h reads kv head h // (H/Hkv)).
    attn_mask: bool, broadcastable to [B, H, Lq, Lk], True = attend. attn_bias: float, same broadcast, added.
    dropout_mask: bool keep-mask [B, H, Lq, Lk]; kept weights are scaled by 1/(1 - dropout_p).
    A row with no visible key gives 0 (its LSE is +inf). LSE (natural log, float32) of the scaled,
    biased, masked scores before dropout is returned with return_lse=True.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    vis = visible_keys(B, Lq, Lk, device=q.device, causal=causal, bottom_right=bottom_right,
                       attn_mask=attn_mask, kv_lens=kv_lens)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    # A row with nothing visible (masks, or a bias of -inf) gives 0, never NaN.
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    s_safe = s.masked_fill(empty, 0.0)
    p = torch.softmax(s_safe, dim=-1).masked_fill(empty, 0.0)
    if dropout_mask is not None and dropout_p > 0.0:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, v)
    if not return_lse:
        return out
    # logsumexp of s_safe, not s: an all -inf row would give a NaN gradient even behind masked_fill.
    lse = torch.logsumexp(s_safe.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    lse = lse.masked_fill(empty.squeeze(-1), float("inf"))
    return out, lse


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
