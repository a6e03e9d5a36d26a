"""fastattn: fused attention kernels for PyTorch.

Builds the pure-Python package (Triton kernels are compiled at run time). The CUDA C++ extension
fastattn._C is added here once csrc/ exists (issue 5).
"""
from setuptools import find_packages, setup

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention, softmax and LayerNorm kernels (Triton, CUDA C++) for PyTorch",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "tqdm"],
)
