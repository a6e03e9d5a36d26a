"""Hugging Face ``transformers`` integration: ``attn_implementation="fastattn"``.

``register_hf_attention()`` registers fastattn's attention function with transformers' AttentionInterface (and
SDPA's mask builder, whose bool masks, True = attend, fastattn takes as they are). It runs when fastattn.nn is
imported after transformers, or call it yourself before ``from_pretrained(..., attn_implementation="fastattn")``.

Models with logit soft-capping (Gemma 2) get it computed in the kernel, and GPT-OSS's learnable attention sinks
(``s_aux``) join the softmax as in eager (``fastattn.attention(sinks=)``). A model's ``sliding_window`` is applied
from indices (no mask) when transformers builds no mask; transformers' SDPA mask builder does build one whenever
the window matters (key length >= window), and that mask, which already holds the window, is then used as is.
HF's bidirectional sliding mask is |i − j| <= w while its flash-attention path uses w − 1: without a mask fastattn
follows the flash-attention convention; the two agree for causal models (Mistral, Gemma 2/3).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.attention import attention

NAME = "fastattn"


# Keyword arguments some models pass that change the attention result and that attention_forward cannot apply.
# (``s_aux`` is applied; ``sinks``, per-row sink logits such as Inkling2's, is not.)
UNSUPPORTED = {"sinks": "per-row attention sinks", "indices": "sparse attention indices",
               "block_indices": "block-sparse attention", "cache": "paged attention caches"}


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, softcap: Optional[float] = None,
                      sliding_window: Optional[int] = None, position_bias: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function interface: (B, H, Lq, D) query, (B, Hkv, Lk, D) key/value (GQA native),
    ``attention_mask`` bool (True = attend) or float (added), broadcastable to (B, H, Lq, Lk).
    Returns ((B, Lq, H, D) output, None): no attention weights.

    ``softcap`` c (Gemma 2's attn_logit_softcapping): scores s = q·kᵀ·scaling become c·tanh(s/c) before the mask.
    ``sliding_window`` w: key j visible iff |i − j| <= w − 1 around the diagonal (HF flash-attention's
    window_size=(w − 1, w − 1); with causal, i − w < j <= i, the mask HF builds for sliding layers).
    ``position_bias`` (T5's relative position bias, broadcastable to (B, H, Lq, Lk)) is added to the scores, with
    its gradient, as transformers' SDPA path adds it to the mask. ``s_aux`` (GPT-OSS's per-head sink logits, [H])
    joins each row's softmax with no value (``sinks`` of fastattn.attention), with its gradient. Inputs that would
    change the result and that this function cannot apply (per-row ``sinks``, sparse indices, paged caches)
    raise, rather than be ignored."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='fastattn' returns no attention weights; use 'eager' for them")
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='fastattn' does not support {UNSUPPORTED[name]} "
                                      f"(the model passes {name!r}); use 'eager'")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    Lq = query.shape[2]
    # As transformers' SDPA path: the causal flag only when no mask was built (prefill); decoding steps get a mask.
    causal = bool(Lq > 1 and attention_mask is None and is_causal)
    local = {}
    if softcap is not None and softcap != 0:  # HF passes None when off; eager divides by it, so 0 is not a value
        local["softcap"] = float(softcap)
    if sliding_window is not None and attention_mask is None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
        local["window_size"] = (sliding_window - 1, sliding_window - 1)
        # Without a mask HF's SDPA convention holds: a prefill (Lq > 1) is top-left (query i at position i; a
        # longer key length is an empty static-cache tail), a single decoding query is the last position.
        if Lq == 1:
            local["causal_alignment"] = "bottom_right"
    # With a mask the mask is exact and already holds the window: it is built from absolute positions (cache
    # offsets, a static cache's fixed-length key buffer, a sliding cache's truncated keys) that this function
    # cannot see, so a window applied from indices here could disagree with it; the mask alone is used.
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        local["sinks"] = sinks
    bias = attention_mask
    if position_bias is not None:
        if attention_mask is None:
            bias = position_bias  # causal, if at all, by the kernels' flag
        elif attention_mask.dtype == torch.bool:
            bias = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            bias = position_bias + attention_mask
    out = attention(query, key, value, causal=causal, attn_bias=bias, scale=scaling, dropout_p=dropout, **local)
    return out.transpose(1, 2).contiguous(), None


def register_hf_attention() -> bool:
    """Register ``attn_implementation="fastattn"``; False when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True
