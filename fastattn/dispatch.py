"""The one place that picks a backend per call: "triton" | "cuda" | "torch".

``backend="auto"`` picks Triton for CUDA tensors and the PyTorch reference for CPU tensors; the environment
variable ``FASTATTN_BACKEND`` replaces that automatic choice (an explicit ``backend=`` argument wins).
Triton on CPU tensors runs the real kernels under the interpreter, only when asked for and only with
``TRITON_INTERPRET=1`` set before fastattn is imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("triton", "cuda", "torch")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # once: torch.compile cannot trace find_spec


def triton_available() -> bool:
    return _HAS_TRITON


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    out = []
    if triton_available() and (device.type == "cuda" or interpreter_enabled()):
        out.append("triton")
    out.append("torch")
    return out


def select(backend: str, x: torch.Tensor) -> str:
    """Resolve ``backend`` for an op whose inputs live on ``x.device``; raise a clear error if it cannot run."""
    if backend == "auto":
        backend = os.environ.get("FASTATTN_BACKEND", "auto")
        if backend == "auto":
            return "triton" if x.is_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing fastattn")
    if backend == "cuda":
        raise RuntimeError("backend='cuda': the CUDA C++ extension fastattn._C is not part of this build yet")
    return backend
