"""fastattn: fused attention kernels for PyTorch (Triton; CUDA C++ to come).

Public API: :func:`attention` (every feature), :func:`scaled_dot_product_attention` (torch's signature).
The unfused oracle lives in :mod:`fastattn.reference`, the numerical test rule in :mod:`fastattn.testing`.
"""
from .ops.attention import attention, scaled_dot_product_attention

__version__ = "0.1.0"
__all__ = ["attention", "scaled_dot_product_attention", "__version__"]
