"""``swap_modules(model)``: put fastattn's modules into an existing model, in place, weights kept.

Each fastattn module subclasses the torch module it replaces and adds no state, so a swap re-classes the
module object itself: parameters, buffers, hooks, device, dtype and training mode stay exactly as they were.
"""
from __future__ import annotations

from torch import nn

from .attention import MultiheadAttention
from .hf import NAME, register_hf_attention
from .layer_norm import LayerNorm
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer


def swap_modules(model: nn.Module, attention: bool = True, layer_norm: bool = True) -> nn.Module:
    """Replace every torch.nn.MultiheadAttention, TransformerEncoderLayer, TransformerDecoderLayer
    (``attention=True``) and torch.nn.LayerNorm (``layer_norm=True``) inside ``model`` by fastattn's; returns
    ``model``. Subclasses of those torch modules are left alone (their forward may differ). A Hugging Face model
    (one with ``set_attn_implementation``) is switched to ``attn_implementation="fastattn"``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    table = {}
    if attention:
        table.update({nn.MultiheadAttention: MultiheadAttention, nn.TransformerEncoderLayer: TransformerEncoderLayer,
                      nn.TransformerDecoderLayer: TransformerDecoderLayer})
    if layer_norm:
        table[nn.LayerNorm] = LayerNorm
    for module in model.modules():
        new = table.get(type(module))
        if new is not None:
            module.__class__ = new
            if new in (TransformerEncoderLayer, TransformerDecoderLayer):
                module.activation_relu_or_gelu = False  # see transformer._adopt_fused_modules
        if isinstance(module, nn.TransformerEncoder) and attention:
            module.use_nested_tensor = False  # its nested-tensor fast path would bypass the fused layers
    if attention and hasattr(model, "set_attn_implementation") and register_hf_attention():
        model.set_attn_implementation(NAME)
    return model
