"""Drop-in modules with torch.nn's exact signatures."""
from .layer_norm import LayerNorm

__all__ = ["LayerNorm"]
