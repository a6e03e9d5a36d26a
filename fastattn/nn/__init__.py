"""Drop-in modules with torch.nn's exact signatures, the reference Transformer, and ``swap_modules``."""
import sys

from .attention import MultiheadAttention
from .hf import register_hf_attention
from .layer_norm import LayerNorm
from .swap import swap_modules
from .transformer import SinusoidalPositionalEncoding, Transformer, TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["LayerNorm", "MultiheadAttention", "SinusoidalPositionalEncoding", "Transformer",
           "TransformerDecoderLayer", "TransformerEncoderLayer", "register_hf_attention", "swap_modules"]

if "transformers" in sys.modules:  # importing transformers costs seconds: only when the user already has
    register_hf_attention()

