"""The one place that picks a backend per call: "triton" | "cuda" | "torch".

``backend="auto"`` picks Triton for CUDA tensors and "torch" (torch's SDPA or the reference) for CPU tensors
(Triton stays the automatic choice over the CUDA C++ backend until benchmarks show which is faster per op); the
environment variable ``FASTATTN_BACKEND`` replaces that automatic choice (an explicit ``backend=`` argument wins).
Triton on CPU tensors runs the real kernels under the interpreter, only when asked for and only with
``TRITON_INTERPRET=1`` set before fastattn is imported. ``backend="cuda"`` needs the extension fastattn._C
(built by setup.py when nvcc is found) and CUDA tensors, or CPU tensors with ``FASTATTN_CUDA_EMULATE=1`` (the
same kernels under a CPU emulator, fastattn._C_emu).
"""
from __future__ import annotations

import importlib
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
    if device.type in ("cuda", "cpu"):
        from . import cuda
        if cuda.available(device):
            out.append("cuda")
    out.append("torch")
    return out


def select(backend: str, x: torch.Tensor, takes=None) -> str:
    """Resolve ``backend`` for an op whose inputs live on ``x.device``; raise a clear error if it cannot run.
    ``takes(kernel_backend) -> bool``: whether that backend's kernels take this call (dtypes, sizes); where they do
    not, the automatic choice (and FASTATTN_BACKEND's) is "torch", as SDPA falls back to its math path (float64,
    head dims over 256), while an explicit ``backend=`` goes on to the op's own error."""
    if backend == "auto":
        backend = os.environ.get("FASTATTN_BACKEND", "auto")
        if backend == "auto":
            backend = "triton" if x.is_cuda and triton_available() else "torch"
        if backend in ("triton", "cuda") and takes is not None and not takes(backend):
            return "torch"
    if backend == "reference":  # fastattn.reference in the input dtype: the §5 baseline (fastattn.testing)
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing fastattn")
    if backend == "cuda":
        why = _cuda_why(str(x.device)) if x.device.type in ("cuda", "cpu") else \
            f"the inputs are on {x.device}, not a CUDA device"
        if why:
            raise RuntimeError(f"backend='cuda' (the CUDA C++ extension fastattn._C) cannot run here: {why}")
    return backend


def _cuda_why(device: str) -> str:
    """fastattn.cuda.why_unavailable(device), "" when it can run; a constant under torch.compile, which cannot
    trace the extension's import."""
    from . import cuda
    return cuda.why_unavailable(device) or ""


# torch.compiler.assume_constant_result(_cuda_why), which only sets this mark, without its import of torch._dynamo:
# that imports triton, and a triton imported before TRITON_INTERPRET is set (`python -m fastattn check` sets it
# after `import fastattn`) runs no kernel on the CPU. tests/test_errors.py checks the mark still works.
_cuda_why._dynamo_marked_constant = True


def kernels(op: str, backend: str):
    """The kernel module of ``op`` ("attention" | "softmax" | "layer_norm") for a resolved kernel backend:
    ``fastattn.<backend>.<op>``, whose ``forward`` / ``backward`` functions take the same arguments. (Plain
    imports, not importlib: torch.compile traces them.)"""
    if backend == "triton":
        from .triton import attention, layer_norm, softmax
    elif backend == "cuda":
        from .cuda import attention, layer_norm, softmax
    else:
        raise RuntimeError(f"no {op} kernels for backend {backend!r}")
    return {"attention": attention, "layer_norm": layer_norm, "softmax": softmax}[op]
