"""Fused softmax: checks, the ``fastattn::softmax_fwd/bwd`` custom ops, and :func:`softmax`.

    y = softmax(x·scale + mask) along ``dim``;  a row that is all −inf gives 0 (torch gives NaN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, reference
from .common import (REFERENCE_BACKENDS, autocast_to, check_kernel_dtype, check_no_forward_ad, check_same,
                     check_tensor, empty, forward_ad, kernels_take, upcast)


def _kernels(backend: str):
    return dispatch.kernels("softmax", backend)


@torch.library.custom_op("fastattn::softmax_fwd", mutates_args=())
def _softmax_fwd(x: Tensor, mask: Optional[Tensor], scale: float, lead: list[int], out_dtype: torch.dtype,
                 backend: str) -> Tensor:
    """x: [R, N] (read densely); mask: [D0|1, D1|1, D2|1, N] with lead = [D0, D1, D2], D0·D1·D2 = R."""
    x = x.contiguous()
    mask = mask.contiguous() if mask is not None and mask.stride(-1) != 1 else mask  # rows read with stride 1
    y = empty(x.shape, like=x, dtype=out_dtype)
    _kernels(backend).forward(x, y, mask, scale, tuple(lead))
    return y


@_softmax_fwd.register_fake
def _(x, mask, scale, lead, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("fastattn::softmax_bwd", mutates_args=())
def _softmax_bwd(y: Tensor, dy: Tensor, scale: float, x_dtype: torch.dtype, mask_grad: bool,
                 backend: str) -> tuple[Tensor, Tensor]:
    dx = empty(y.shape, like=y, dtype=x_dtype)
    dz = empty(y.shape, like=y, dtype=torch.float32) if mask_grad else None
    _kernels(backend).backward(y, dy.contiguous(), dx, dz, scale)
    return dx, (dz if dz is not None else y.new_empty(0, dtype=torch.float32))  # the fake's dtype


@_softmax_bwd.register_fake
def _(y, dy, scale, x_dtype, mask_grad, backend):
    return y.new_empty(y.shape, dtype=x_dtype), y.new_empty(y.shape if mask_grad else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, mask, scale, lead, out_dtype, backend = inputs
    ctx.save_for_backward(output)
    ctx.params = (scale, x.dtype)
    ctx.mask_shape = None if mask is None else tuple(mask.shape)
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.lead = tuple(lead)
    ctx.backend = backend


def _backward(ctx, dy):
    y, = ctx.saved_tensors
    mask_grad = ctx.mask_shape is not None and ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True: torch ops of the output y, so that they differentiate again
        yf = y.float()  # dz = y (dy − Σ dy·y), the gradient of the logits z = x·scale + mask
        dz = yf * (dy.float() - (dy.float() * yf).sum(-1, keepdim=True))
        dx = (dz * ctx.params[0]).to(ctx.params[1])
    else:
        dx, dz = _softmax_bwd(y, dy, *ctx.params, mask_grad, ctx.backend)
    dmask = None
    if mask_grad:  # sum dz over the mask's broadcast dims
        dz = dz.view(*ctx.lead, dz.shape[-1])
        dims = [i for i in range(3) if ctx.mask_shape[i] == 1]
        dmask = (dz.sum(dim=dims, keepdim=True) if dims else dz).to(ctx.mask_dtype)
    return dx, dmask, None, None, None, None


_softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_mask_shape(mask: Tensor, x: Tensor) -> None:
    if mask.dim() > x.dim():
        raise ValueError(f"mask of shape {tuple(mask.shape)} has more dims than x {tuple(x.shape)}")
    try:
        ok = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}")


def _mask_4d(mask: Tensor, x: Tensor) -> tuple[Tensor, list[int]]:
    """Broadcast ``mask`` (checked) against x [..., N] and view both as 4-d [D0, D1, D2, N] problems."""
    N = x.shape[-1]
    if mask.shape[-1] != N or mask.stride(-1) != 1:  # the kernel reads mask rows with stride 1
        mask = mask.expand(*mask.shape[:-1], N).contiguous()
    lead = list(x.shape[:-1])
    mshape = [1] * (len(lead) - (mask.dim() - 1)) + list(mask.shape[:-1])
    mask = mask.view(*mshape, N)
    if len(lead) > 3:  # merge the outer dims (copies the mask only if they cannot be merged as a view)
        mask = mask.expand(*lead, N).reshape(-1, *lead[-2:], N)
        lead = [math.prod(lead[:-2])] + lead[-2:]
    while len(lead) < 3:
        lead.insert(0, 1)
        mask = mask.unsqueeze(0)
    return mask, lead


def softmax(x: Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None, *, scale: float = 1.0,
            mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``torch.softmax(x, dim, dtype)`` fused, optionally of ``x·scale + mask`` (mask: float, broadcastable
    to x, additive, over the last dim only). fp32 accumulation; a row of −inf gives zeros, not NaN. ``dtype``
    (the output's): x is read at its own precision and the result rounded once, where torch first casts x to
    dtype (rounding it too when dtype is narrower: fp32 x to fp16 output, torch errs up to ~4× more)."""
    if isinstance(x, Tensor) and not x.is_floating_point() and dtype is not None and dtype.is_floating_point:
        x = x.to(dtype)  # as torch.softmax: integer x with a floating dtype is converted first
    if dtype is None and autocast_to(x, "fp32") is not None:  # torch's CUDA autocast: fp32 unless dtype is given
        x = x.float()
    check_tensor(x, "x")
    if not -max(x.dim(), 1) <= dim < max(x.dim(), 1):  # a 0-d x takes dim 0 or −1, as torch
        raise ValueError(f"dim {dim} is out of range for x with {x.dim()} dims")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    dim = dim % max(x.dim(), 1)
    if mask is not None:
        check_tensor(mask, "mask")
        check_same(x, "x", mask, "mask", dtype=False)
        if dim != x.dim() - 1:
            raise ValueError("mask is only supported with dim=-1 (the last dim)")
        _check_mask_shape(mask, x)
        mask = mask.reshape(1) if mask.dim() == 0 else mask
    use = dispatch.select(backend, x, lambda b: kernels_take((x, "x"), (x.new_empty(0, dtype=dtype or x.dtype),
                                                                      "dtype"))(b) and not forward_ad(mask))
    if use in REFERENCE_BACKENDS or x.dim() == 0 or x.numel() == 0:  # empty: an empty result, as torch
        # "torch" computes fp16/bf16 in fp32, a requested fp16/bf16 dtype too, and rounds once
        cdtype = upcast(use, x.new_empty(0, dtype=dtype)).dtype if dtype is not None else None
        return reference.softmax(upcast(use, x), dim, dtype=cdtype, scale=scale, mask=upcast(use, mask)).to(
            dtype or x.dtype)
    check_kernel_dtype(x, "x", use)
    check_no_forward_ad(mask, "mask", use)
    out_dtype = dtype or x.dtype
    check_kernel_dtype(x.new_empty(0, dtype=out_dtype), "dtype", use)
    xm = x.movedim(dim, -1) if dim != x.dim() - 1 else x
    shape = xm.shape
    x2d = xm.reshape(-1, shape[-1]).contiguous()
    mask4d, lead = (None, [1, 1, x2d.shape[0]]) if mask is None else _mask_4d(mask, xm)
    y = _softmax_fwd(x2d, mask4d, float(scale), lead, out_dtype, use).view(shape)
    return y.movedim(-1, dim) if dim != x.dim() - 1 else y
