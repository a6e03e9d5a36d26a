"""One canonical mask form, and converters from every accepted input form.

Canonical form, as the kernels and :func:`fastattn.reference.attention` take it:

* ``mask``: bool tensor with 4 dims, each 1 or full size, broadcastable to [B, H, Lq, Lk]; True = attend.
* ``bias``: floating tensor, same broadcast rule, added to the scaled scores.
* ``kv_lens``: int32 [B]; keys j >= kv_lens[b] are padding (right padding).
* ``causal`` + ``bottom_right``: see :func:`fastattn.reference.visible_keys`.

Broadcast dims are kept at size 1 (never expanded), so an [Lq, Lk] mask costs Lq·Lk bytes, not B·H·Lq·Lk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def as_4d(t: Tensor, name: str, full: tuple[int, int, int, int]) -> Tensor:
    """View ``t`` with 4 dims (leading 1s prepended); each dim must be 1 or equal to ``full``'s."""
    if t.dim() > 4 or t.dim() < 1:
        raise ValueError(f"{name} must have 1 to 4 dims broadcastable to (B, H, Lq, Lk)={full}, got shape {tuple(t.shape)}")
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    for got, want in zip(shape, full):
        if got != 1 and got != want:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to (B, H, Lq, Lk)={full}")
    return t.view(shape) if t.dim() != 4 else t


def key_padding_mask_to_mask(key_padding_mask: Tensor, B: int, Lk: int, *, true_means: str) -> Tensor:
    """[B, Lk] key padding mask -> canonical [B, 1, 1, Lk] bool mask (True = attend).

    ``true_means="ignore"`` is nn.MultiheadAttention's (and fastattn.attention's) convention,
    ``"attend"`` is SDPA's / Hugging Face's.
    """
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor, got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (B, Lk):
        raise ValueError(f"key_padding_mask must have shape (B, Lk)=({B}, {Lk}), got {tuple(key_padding_mask.shape)}")
    m = ~key_padding_mask if true_means == "ignore" else key_padding_mask
    return m.view(B, 1, 1, Lk)


def and_masks(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """Intersection of two canonical masks (None = all visible)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b



def unpad(x: Tensor, key_padding_mask: Tensor):
    """Padded -> packed: x [B, L, ...] and key_padding_mask bool [B, L] (True = padding, as
    ``fastattn.attention``'s key_padding_mask) -> (x_packed [total, ...], indices [total] into x.flatten(0, 1),
    cu_seqlens int32 [B + 1], max_seqlen int). Tokens keep their order; padding may sit anywhere. Differentiable."""
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                        f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
    if not isinstance(x, Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != tuple(key_padding_mask.shape):
        raise ValueError(f"x must be [B, L, ...] with (B, L) = key_padding_mask's {tuple(key_padding_mask.shape)}, "
                         f"got {tuple(getattr(x, 'shape', ()))}")
    if key_padding_mask.device != x.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but x is on {x.device}")
    valid = ~key_padding_mask
    lens = valid.sum(dim=1, dtype=torch.int32)
    indices = valid.flatten().nonzero().flatten()
    cu = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu[1:] = lens.cumsum(0)
    max_seqlen = int(lens.max()) if lens.numel() else 0
    return x.flatten(0, 1).index_select(0, indices), indices, cu, max_seqlen


def pad(x_packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Packed -> padded, the inverse of :func:`unpad`: [total, ...] -> [batch, seqlen, ...] with zeros at the
    padding. Differentiable."""
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor (as unpad returns it), got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 1 or indices.shape[0] != x_packed.shape[0]:
        raise ValueError(f"indices must be 1-d with one entry per packed row ({x_packed.shape[0]}), "
                         f"got shape {tuple(indices.shape)}")
    if not torch.compiler.is_compiling() and indices.numel() > 0:  # a host sync; skipped while tracing
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()
        if lo < 0 or hi >= batch * seqlen:
            raise ValueError(f"indices must lie in [0, batch·seqlen = {batch * seqlen}), got [{lo}, {hi}]")
        if indices.unique().numel() != indices.numel():
            raise ValueError("indices must be distinct (each packed row goes to its own padded position)")
    out = x_packed.new_zeros((batch * seqlen, *x_packed.shape[1:]))
    return out.index_copy(0, indices, x_packed).view(batch, seqlen, *x_packed.shape[1:])


# Philox-4x32-10, as Triton's tl.rand draws it: one uniform per 64-bit counter, key = the 64-bit seed
_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a·b for a in [0, 2^32) (int64 tensor) and a 32-bit constant b, in int64 pieces
    that cannot overflow (16-bit halves)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = ((a_hi * b_lo + a_lo * b_hi) << 16) + a_lo * b_lo  # < 2^50
    return a_hi * b_hi + (t >> 32), t & _M32


def philox_uniform(seed: int, counters: Tensor) -> Tensor:
    """fp32 uniforms in [0, 1) for int64 ``counters`` (>= 0), bit for bit what ``tl.rand(seed, counters)`` gives
    in the Triton kernels (and the CUDA backend's Philox): the dropout mask of the torch code paths that must draw
    the kernels' mask (context parallelism's torch blocks)."""
    c = counters.to(torch.int64)
    c0, c1 = c & _M32, (c >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = int(seed) & _M32, (int(seed) >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    x = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep(seed: int, dropout_p: float, counters: Tensor) -> Tensor:
    """The kernels' keep-mask at ``counters``: philox_uniform >= p, p rounded to fp32 as the kernels take it."""
    return philox_uniform(seed, counters) >= torch.tensor(dropout_p, dtype=torch.float32)
