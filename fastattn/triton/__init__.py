"""Triton kernels, one module per op. Importing them needs TRITON_INTERPRET=1 set first to run on CPU."""
import contextlib

import torch


def device_ctx(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
