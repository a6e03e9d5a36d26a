"""``fastattn.nn.LayerNorm``: a subclass of torch.nn.LayerNorm (same constructor, parameters, state_dict keys)
whose forward runs the fused kernel, and optionally the fused residual add."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.layer_norm import add_layer_norm, layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm, fused. ``forward(x)`` is torch's; ``forward(x, residual)`` returns
    LayerNorm(x + residual), and with ``prenorm=True`` the pair (LayerNorm(x + residual), x + residual)."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, prenorm: bool = False):
        if residual is None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                              prenorm=prenorm)
