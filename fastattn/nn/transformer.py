"""Transformer layers with fused attention and fused residual-add + LayerNorm, and the reference Transformer.

``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` subclass torch's (same constructor, parameters and
state_dict keys); their attention and LayerNorm submodules are fastattn's, and each residual add is fused into
the LayerNorm that follows it:

    post-norm (norm_first=False):  x = LN(x + SA(x));              x = LN(x + FF(x))
    pre-norm  (norm_first=True):   x = x + SA(LN(x));              x = x + FF(LN(x))   (the add feeds the next LN)

``Transformer`` is the encoder-decoder of "Attention Is All You Need" (post-norm, sinusoidal positions, √d-scaled
embeddings, padding and future masks). ``fused=True`` runs fastattn's kernels; ``fused=False`` is its unfused
twin, built only from ``fastattn.reference``: the same modules and parameters, so one state_dict loads into both.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import reference
from ..ops.attention import attention
from ..ops.layer_norm import add_layer_norm
from .attention import MultiheadAttention
from .layer_norm import LayerNorm


# --------------------------------------------------------------------------------------------- residual + norm
def _add_norm(norm: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """norm(x + residual), fused when ``norm`` is fastattn's LayerNorm."""
    return norm(x, residual) if isinstance(norm, LayerNorm) else norm(x + residual)


def _add_then_norm(norm: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(x + residual), x + residual), fused when ``norm`` is fastattn's LayerNorm."""
    if isinstance(norm, LayerNorm):
        return norm(x, residual, prenorm=True)
    h = x + residual
    return norm(h), h


def _refuse_nested(*xs: Tensor) -> None:
    if any(x.is_nested for x in xs):  # torch's layers take them only on their inference fast path
        raise ValueError("nested tensors are not supported by fastattn's layers: pass a padded batch and its key "
                         "padding mask (the kernels skip the padded keys)")


def _adopt_fused_modules(layer: nn.Module) -> None:
    """Re-class torch's attention and LayerNorm submodules of ``layer`` as fastattn's (same parameters)."""
    for name, child in layer.named_children():
        if type(child) is nn.MultiheadAttention:
            child.__class__ = MultiheadAttention
        elif type(child) is nn.LayerNorm:
            child.__class__ = LayerNorm
    # torch.nn.TransformerEncoder converts padded inputs to nested tensors for layers it believes are its own
    # (this flag is one of its conditions); nested tensors would bypass this forward.
    layer.activation_relu_or_gelu = False


def _fused_init(torch_layer):
    """torch_layer's constructor, with its exact signature (inspect shows it), then its submodules re-classed."""
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        torch_layer.__init__(self, d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                             batch_first, norm_first, bias, device, dtype)
        _adopt_fused_modules(self)
    return __init__


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer (same signature) with fused attention and fused add + LayerNorm.

    Masks follow torch's module convention (bool True = ignore, float added); a row with no visible key gives 0
    (gradients 0), never NaN."""

    __init__ = _fused_init(nn.TransformerEncoderLayer)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        _refuse_nested(src)
        x = src
        if self.norm_first:
            sa = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            y, h = _add_then_norm(self.norm2, sa, x)
            return h + self._ff_block(y)
        x = _add_norm(self.norm1, self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal), x)
        return _add_norm(self.norm2, self._ff_block(x), x)


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer (same signature) with fused attention and fused add + LayerNorm."""

    __init__ = _fused_init(nn.TransformerDecoderLayer)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        _refuse_nested(tgt, memory)
        x = tgt
        if self.norm_first:
            sa = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            y, x = _add_then_norm(self.norm2, sa, x)
            ca = self._mha_block(y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            y, x = _add_then_norm(self.norm3, ca, x)
            return x + self._ff_block(y)
        x = _add_norm(self.norm1, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x)
        x = _add_norm(self.norm2, self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                                  memory_is_causal), x)
        return _add_norm(self.norm3, self._ff_block(x), x)


# --------------------------------------------------------------------------------------------- reference model
class SinusoidalPositionalEncoding(nn.Module):
    """x + PE[:L] then dropout, with PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
    Input (B, L, d)."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        inv = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * inv)
        pe[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
        self.register_buffer("pe", pe.float(), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len {self.pe.shape[0]}")
        return self.dropout(x + self.pe[: x.shape[1]].to(x.dtype))


class _Kernels:
    """The two functions a layer calls: fastattn's fused ops, or the unfused reference (the twin)."""

    def __init__(self, fused: bool):
        self.fused = fused

    def attention(self, q, k, v, *, causal: bool, key_padding_mask: Optional[Tensor], dropout_p: float):
        if self.fused:
            return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        keep = None
        if dropout_p > 0.0:
            keep = torch.rand(q.shape[:3] + k.shape[2:3], device=q.device) >= dropout_p
        return reference.attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p, dropout_mask=keep)

    def add_layer_norm(self, x, residual, norm: nn.LayerNorm):
        fn = add_layer_norm if self.fused else reference.add_layer_norm
        return fn(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class _MultiHead(nn.Module):
    """Multi-head attention on (B, L, d): separate q/k/v/out projections, heads of d / nhead."""

    def __init__(self, d_model: int, nhead: int, dropout: float, kernels: _Kernels):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} must be divisible by nhead {nhead}")
        self.nhead, self.dropout, self.kernels = nhead, dropout, kernels
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor, memory: Tensor, *, causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, Lq, d = x.shape
        split = lambda t: t.view(B, t.shape[1], self.nhead, d // self.nhead).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(memory)), split(self.v_proj(memory))
        o = self.kernels.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                   dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(B, Lq, d))


class _FeedForward(nn.Sequential):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__(nn.Linear(d_model, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(dim_feedforward, d_model))


class EncoderLayer(nn.Module):
    """x = LN(x + Dropout(SelfAttn(x))); x = LN(x + Dropout(FFN(x)))."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, kernels: _Kernels):
        super().__init__()
        self.kernels = kernels
        self.self_attn = _MultiHead(d_model, nhead, dropout, kernels)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        a = self.dropout(self.self_attn(x, x, key_padding_mask=key_padding_mask))
        x = self.kernels.add_layer_norm(a, x, self.norm1)
        return self.kernels.add_layer_norm(self.dropout(self.ff(x)), x, self.norm2)


class DecoderLayer(nn.Module):
    """Masked self-attention (future + target padding), cross-attention to the encoder output (source padding),
    FFN; each followed by residual add + LayerNorm."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, kernels: _Kernels):
        super().__init__()
        self.kernels = kernels
        self.self_attn = _MultiHead(d_model, nhead, dropout, kernels)
        self.cross_attn = _MultiHead(d_model, nhead, dropout, kernels)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, tgt_key_padding_mask: Optional[Tensor],
                memory_key_padding_mask: Optional[Tensor]) -> Tensor:
        a = self.dropout(self.self_attn(x, x, causal=True, key_padding_mask=tgt_key_padding_mask))
        x = self.kernels.add_layer_norm(a, x, self.norm1)
        a = self.dropout(self.cross_attn(x, memory, key_padding_mask=memory_key_padding_mask))
        x = self.kernels.add_layer_norm(a, x, self.norm2)
        return self.kernels.add_layer_norm(self.dropout(self.ff(x)), x, self.norm3)


class Transformer(nn.Module):
    """Encoder-decoder Transformer on token ids: ``forward(src (B, S), tgt (B, T)) -> logits (B, T, tgt_vocab)``.

    Padding tokens (``pad_id``) are masked as keys in every attention; the decoder's self-attention is causal.
    ``fused=True`` runs fastattn's kernels, ``fused=False`` the unfused reference; parameters are identical."""

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, max_len: int = 5000, pad_id: int = 0, fused: bool = True):
        super().__init__()
        self.d_model, self.pad_id, self.fused = d_model, pad_id, fused
        kernels = _Kernels(fused)
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id)
        self.pos = SinusoidalPositionalEncoding(d_model, max_len, dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward, dropout, kernels)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, nhead, dim_feedforward, dropout, kernels)
                                     for _ in range(num_decoder_layers))
        self.generator = nn.Linear(d_model, tgt_vocab)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """-> (memory (B, S, d), source padding mask (B, S), True = padding)."""
        pad = src == self.pad_id
        x = self.pos(self.src_embed(src) * math.sqrt(self.d_model))
        for layer in self.encoder:
            x = layer(x, pad)
        return x, pad

    def decode(self, tgt: Tensor, memory: Tensor, src_pad: Tensor) -> Tensor:
        pad = tgt == self.pad_id
        x = self.pos(self.tgt_embed(tgt) * math.sqrt(self.d_model))
        for layer in self.decoder:
            x = layer(x, memory, pad, src_pad)
        return self.generator(x)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        memory, src_pad = self.encode(src)
        return self.decode(tgt, memory, src_pad)
