"""Triton kernels, one module per op. Importing them needs TRITON_INTERPRET=1 set first to run on CPU."""
import contextlib
import os

import numpy as np
import torch


def _interpreter_dot_fixed_order():
    """Under TRITON_INTERPRET=1, ``tl.dot`` is ``numpy.matmul``, i.e. OpenBLAS, whose sgemm kernels on some CPUs
    (e.g. the Haswell/Zen path) round an output element differently depending on where it sits in the tile. A GPU
    dot reduces every element in the same order, and the attention backward relies on that: D_i and dp_ij go
    through the same dot, so a row with one visible key cancels to an exactly zero gradient. ``einsum`` (no BLAS)
    reduces each element in one fixed order on every CPU, so the interpreter keeps that GPU property."""
    from triton.runtime import interpreter

    blas_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:  # fp8 / int8: triton's own path
            return blas_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.einsum("...ik,...kj->...ij", a.data, b.data, dtype=d.data.dtype)
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreter_dot_fixed_order()


def device_ctx(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
