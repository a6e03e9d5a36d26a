"""``fastattn.nn.MultiheadAttention``: torch.nn.MultiheadAttention with the attention fused.

A subclass of torch's module: same constructor, parameters and state_dict keys, so weights load both ways and
``swap_modules`` can re-class an existing module in place. ``forward`` follows torch's semantics:

    out = out_proj(concat_h softmax(q_h·k_hᵀ/√d + mask) · v_h),  q_h, k_h, v_h = in-projections of query, key, value

Masks arrive in torch's module convention: bool True = *ignore* (both ``key_padding_mask`` and ``attn_mask``),
float = added to the scores. ``need_weights=True`` returns the weights, which are L×L by definition, so that
call runs torch's own implementation (bitwise torch's result).

Two keyword-only constructor options go beyond torch (DESIGN.md §3, computed in the kernel from indices, never as
an L×L tensor): ``window_size=(left, right)`` (−1 = unbounded) lets query i see key j iff i − left <= j <= i + right
(top-left diagonal; ``is_causal`` sets right = 0), and ``alibi=True`` adds −slope_h·|i − j| to the scores with
``fastattn.alibi_slopes(num_heads)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import attention
from ..reference import alibi_slopes


def _bool_or_float(mask: Optional[Tensor], name: str) -> Optional[Tensor]:
    if mask is None or mask.dtype == torch.bool or mask.is_floating_point():
        return mask
    raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


def _padding_bool(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A key padding mask as bool, True = padding: a float one must hold 0 (attend) and −inf (padding) only, as
    torch's conversion of a bool mask gives (one host sync); other values would be a bias."""
    if key_padding_mask is None or key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    pad = torch.isneginf(key_padding_mask)
    if not bool(((key_padding_mask == 0) | pad).all()):
        raise ValueError("a float key_padding_mask with context_parallel_group must hold only 0 (attend) and -inf "
                         "(padding): an additive bias is not supported; pass a bool mask")
    return pad


def _merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, Lq: int,
                 Lk: int):
    """torch-module masks -> (attn_bias for fastattn.attention, key_padding_mask True = ignore).

    attn_mask: (Lq, Lk) or (B·H, Lq, Lk); key_padding_mask: (B, Lk). Bool masks stay bool (the kernels read them
    directly); a float key-padding mask is folded into a float bias."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (Lq, Lk):
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} should be ({Lq}, {Lk})")
            bias = attn_mask[None, None]
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (B * H, Lq, Lk):
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} should be ({B * H}, {Lq}, {Lk})")
            bias = attn_mask.view(B, H, Lq, Lk)
        else:
            raise ValueError(f"attn_mask must be 2-d or 3-d, got {attn_mask.dim()} dims")
        if bias.dtype == torch.bool:
            bias = ~bias  # fastattn's attn_bias: True = attend
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} should be ({B}, {Lk})")
        if key_padding_mask.is_floating_point():
            kpm_bias = key_padding_mask[:, None, None, :]
            if bias is None:
                bias = kpm_bias
            elif bias.dtype == torch.bool:
                bias = kpm_bias.masked_fill(~bias, float("-inf"))
            else:
                bias = bias + kpm_bias
            key_padding_mask = None
    return bias, key_padding_mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention (same signature), fused attention in ``forward``; keyword-only extras
    ``window_size`` (local attention) and ``alibi`` (ALiBi slopes), see the module docstring.

    ``context_parallel_group`` (keyword-only): a torch.distributed group; ``forward`` then takes this rank's shards
    of the sequence (``fastattn.distributed.shard``, zigzag layout, along the module's sequence dim) and runs
    ring attention over the group (see :meth:`_context_parallel_forward`); ``context_parallel_strategy``
    "ulysses" runs DeepSpeed-Ulysses all-to-alls instead (``fastattn.distributed.context_parallel_attention``'s
    ``strategy``)."""

    # Class-level defaults: swap_modules re-classes torch modules in place without running __init__.
    window_size: Optional[tuple[int, int]] = None
    alibi: bool = False
    context_parallel_group = None
    context_parallel_strategy: str = "ring"

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 window_size: Optional[tuple[int, int]] = None, alibi: bool = False,
                 context_parallel_group=None, context_parallel_strategy: str = "ring") -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.context_parallel_group = context_parallel_group
        self.context_parallel_strategy = context_parallel_strategy
        if window_size is not None:
            if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
                    or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
                raise ValueError(f"window_size must be None or a pair (left, right) of ints >= -1, got {window_size!r}")
            window_size = (int(window_size[0]), int(window_size[1]))
        if (window_size is not None or alibi) and (self.bias_k is not None or self.add_zero_attn):
            # The appended keys have no sequence position for a window or a distance to be measured from.
            raise ValueError("window_size / alibi cannot be combined with add_bias_kv or add_zero_attn")
        self.window_size = window_size
        self.alibi = bool(alibi)
        if self.alibi:
            # A buffer so it follows .to(device); non-persistent so state_dict keys stay torch's.
            self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads).to(self.out_proj.weight.device),
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._remake_slopes()
        return self

    def _reset_parameters(self):
        super()._reset_parameters()
        self._remake_slopes()

    def _remake_slopes(self):
        """The ALiBi buffer (not in the state_dict) made afresh wherever it lands: fp32 after .half() etc., exact
        (not re-rounded), and real values after to_empty() from a meta-device module (which leaves them garbage)."""
        slopes = self._buffers.get("alibi_slopes")
        if slopes is not None and slopes.device.type != "meta":
            self._buffers["alibi_slopes"] = alibi_slopes(self.num_heads).to(slopes.device)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.context_parallel_group is not None:
            return self._context_parallel_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                                  is_causal)
        slopes = self._buffers.get("alibi_slopes") if self.alibi else None
        if query.is_nested or key.is_nested or value.is_nested:  # torch's fast path takes nested tensors
            if self.window_size is not None or slopes is not None:
                raise ValueError("nested tensors run torch's implementation, which has no window_size / alibi")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if need_weights:
            if self.window_size is not None or slopes is not None:
                raise ValueError("need_weights=True runs torch's implementation, which has no window_size / alibi; "
                                 "call with need_weights=False (the weights would be an L×L tensor)")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        key_padding_mask = _bool_or_float(key_padding_mask, "key_padding_mask")
        attn_mask = _bool_or_float(attn_mask, "attn_mask")

        if attn_mask is not None and attn_mask.dim() not in (2, 3):  # checked before the hint drops it
            raise ValueError(f"attn_mask must be 2-d or 3-d, got {attn_mask.dim()} dims")
        # The is_causal hint promises that attn_mask is the causal mask, so the kernel builds it from indices.
        # torch uses the hint only without a key-padding mask (SDPA takes a mask or is_causal, not both); the
        # kernels take both, so a square self-attention also keeps the hint with one (the padding stays a
        # [B, 1, 1, L] mask, no [B, 1, L, L] one is built, and the blocks above the diagonal are skipped). Keys
        # appended by add_bias_kv / add_zero_attn, which torch's mask leaves visible, keep torch's rule.
        seq = 1 if query.dim() == 3 and self.batch_first else 0
        square = (query.dim() == key.dim() and query.shape[seq] == key.shape[seq] and self.bias_k is None
                  and not self.add_zero_attn)
        causal = is_causal and (key_padding_mask is None or square)
        hinted = None  # a mask the hint replaces where torch reads it: checked as torch checks it
        if causal:
            attn_mask, hinted = None, attn_mask if key_padding_mask is not None else None

        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (L, 1, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif query.dim() != 3:
            raise ValueError(f"query must be 2-d (unbatched) or 3-d, got shape {tuple(query.shape)}")
        elif self.batch_first:  # work in (L, B, E) like torch's functional form
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        Lq, B, E = query.shape
        H, Dh = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"query's embedding size {E} differs from embed_dim {self.embed_dim}")
        if key.shape[1] != B or value.shape[1] != B or key.shape[0] != value.shape[0]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not match query "
                             f"{tuple(query.shape)} in batch / length")

        q, k, v = self._in_projection(query, key, value)
        if self.bias_k is not None:  # add_bias_kv: one learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.expand(1, B, -1)])
            v = torch.cat([v, self.bias_v.expand(1, B, -1)])
        # (L, B, H·Dh) -> (B, H, L, Dh)
        q, k, v = (x.reshape(x.shape[0], B, H, Dh).permute(1, 2, 0, 3) for x in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, Dh)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, Dh)], dim=2)
        Lk = k.shape[2]
        extra = Lk - key.shape[0]  # appended key columns (bias_k, zero attention), visible to every query
        if extra:
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, extra))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, extra))
        if hinted is not None:
            _merge_masks(hinted, None, B, H, Lq, Lk)
        bias, kpm = _merge_masks(attn_mask, key_padding_mask, B, H, Lq, Lk)
        local = {}
        if self.window_size is not None:
            local["window_size"] = self.window_size
        if slopes is not None:
            local["alibi_slopes"] = slopes
        out = attention(q, k, v, causal=causal, key_padding_mask=kpm, attn_bias=bias,
                        dropout_p=self.dropout if self.training else 0.0, **local)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(Lq, B, E), self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one GEMM for q, k and v
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _context_parallel_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """Self-attention of this rank's shards over ``context_parallel_group`` (ring attention): query, key and
        value hold the same positions; ``is_causal=True`` (no attn_mask needed), ``window_size`` and ALiBi are in
        global positions; dropout draws the whole sequence's mask (fastattn.distributed); ``key_padding_mask``
        (B, L_local) is this rank's shard of the keys' padding (bool True, or float −inf, = padding)."""
        from ..distributed import context_parallel_attention

        try:  # a check failing on one rank joins the ring's exchange of shapes, so no other rank waits for it
            q, k, v, kpm, L, B, E, unbatched = self._context_parallel_inputs(query, key, value, key_padding_mask,
                                                                             need_weights, attn_mask)
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
            return context_parallel_attention(None, None, None, self.context_parallel_group, _error=e)
        out = context_parallel_attention(q, k, v, self.context_parallel_group, causal=is_causal,
                                         dropout_p=self.dropout if self.training else 0.0,
                                         window_size=self.window_size or (-1, -1), key_padding_mask=kpm,
                                         strategy=self.context_parallel_strategy,
                                         alibi_slopes=self._buffers.get("alibi_slopes") if self.alibi else None)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(L, B, E), self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _context_parallel_inputs(self, query, key, value, key_padding_mask, need_weights, attn_mask):
        """The checks of :meth:`_context_parallel_forward` and its projected q, k, v [B, H, L, Dh]."""
        if need_weights:
            raise ValueError("need_weights=True is not available with context_parallel_group (the weights span every "
                             "rank's keys): pass need_weights=False")
        if attn_mask is not None:
            raise ValueError("with context_parallel_group the masks are causal (is_causal=True, no attn_mask) and "
                             "key_padding_mask: attn_mask must be None")
        key_padding_mask = _padding_bool(_bool_or_float(key_padding_mask, "key_padding_mask"))
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported with context_parallel_group")
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (L, 1, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif query.dim() != 3:
            raise ValueError(f"query must be 2-d (unbatched) or 3-d, got shape {tuple(query.shape)}")
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        L, B, E = query.shape
        if E != self.embed_dim:
            raise ValueError(f"query's embedding size {E} differs from embed_dim {self.embed_dim}")
        if key.shape[:2] != (L, B) or value.shape[:2] != (L, B):
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be shards of the same "
                             f"positions as query {tuple(query.shape)} (self-attention)")
        H, Dh = self.num_heads, self.head_dim
        q, k, v = (x.reshape(L, B, H, Dh).permute(1, 2, 0, 3) for x in self._in_projection(query, key, value))
        return q, k, v, key_padding_mask, L, B, E, unbatched
