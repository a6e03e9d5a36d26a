"""Hugging Face ``transformers`` integration: ``attn_implementation="fastattn"``.

``register_hf_attention()`` registers fastattn's attention function with transformers' AttentionInterface (and
SDPA's mask builder, whose bool masks, True = attend, fastattn takes as they are). It runs when fastattn.nn is
imported after transformers, or call it yourself before ``from_pretrained(..., attn_implementation="fastattn")``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.attention import attention

NAME = "fastattn"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, softcap: Optional[float] = None, **kwargs):
    """transformers' attention-function interface: (B, H, Lq, D) query, (B, Hkv, Lk, D) key/value (GQA native),
    ``attention_mask`` bool (True = attend) or float (added), broadcastable to (B, H, Lq, Lk).
    Returns ((B, Lq, H, D) output, None): no attention weights."""
    if softcap:
        raise NotImplementedError("fastattn's HF attention does not support softcap yet")
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='fastattn' returns no attention weights; use 'eager' for them")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' SDPA path: the causal flag only when no mask was built (prefill); decoding steps get a mask.
    causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = attention(query, key, value, causal=causal, attn_bias=attention_mask, scale=scaling,
                    dropout_p=dropout)
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
