"""fastattn: fused attention kernels for PyTorch (Triton, and CUDA C++ with backend="cuda").

Public API: :func:`attention` (every feature), :func:`scaled_dot_product_attention` (torch's signature),
:func:`alibi_slopes` (ALiBi's standard slopes), :func:`unpad` / :func:`pad` (padded <-> packed), :func:`softmax`, :func:`layer_norm`, :func:`add_layer_norm` (torch's semantics), modules in :mod:`fastattn.nn`.
Context parallelism (ring attention over torch.distributed) in :mod:`fastattn.distributed`.
The unfused oracle lives in :mod:`fastattn.reference`, the numerical test rule in :mod:`fastattn.testing`.
"""
from .ops.attention import attention, scaled_dot_product_attention
from .ops.layer_norm import add_layer_norm, layer_norm
from .ops.softmax import softmax
from .masks import pad, unpad
from .reference import alibi_slopes
from . import distributed  # cheap: torch has imported torch.distributed already
from . import nn  # the drop-in modules: `import fastattn` then fastattn.nn.LayerNorm(...), as torch.nn

__version__ = "0.1.0"
__all__ = ["alibi_slopes", "distributed", "nn", "pad", "unpad", "attention", "scaled_dot_product_attention", "softmax", "layer_norm", "add_layer_norm", "__version__"]
