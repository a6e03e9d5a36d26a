"""Fused LayerNorm and residual-add + LayerNorm: checks, the ``fastattn::layer_norm_fwd/bwd`` custom ops,
and :func:`layer_norm` / :func:`add_layer_norm`.

    y = (s − mean(s)) / sqrt(var(s) + eps) · weight + bias,   s = x  or  x + residual
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch, reference
from .common import (REFERENCE_BACKENDS, autocast_to, check_kernel_dtype, check_same, check_tensor, empty,
                     kernels_take, upcast)


def _kernels(backend: str):
    return dispatch.kernels("layer_norm", backend)


@torch.library.custom_op("fastattn::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: [R, N] (the kernels read them densely). -> (y, s = x + residual or an empty tensor, mean,
    rstd), contiguous."""
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    weight = weight.contiguous() if weight is not None else None  # the kernels read them with stride 1
    bias = bias.contiguous() if bias is not None else None
    R = x.shape[0]
    y = empty(x.shape, like=x)
    s = empty(x.shape, like=x) if residual is not None else None
    mean = empty((R,), like=x, dtype=torch.float32)
    rstd = empty((R,), like=x, dtype=torch.float32)
    _kernels(backend).forward(x, residual, weight, bias, y, s, mean, rstd, eps)
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, backend):
    R = x.shape[0]
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), s, x.new_empty(R, dtype=torch.float32), x.new_empty(R, dtype=torch.float32)


@torch.library.custom_op("fastattn::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, dsum: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor,
                    rstd: Tensor, wb_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (ds, dweight, dbias) with dweight/dbias in fp32 (empty when not wanted)."""
    k = _kernels(backend)
    s = s.contiguous()  # the saved x of a raw call may be strided; the kernels read it densely
    weight = weight.contiguous() if weight is not None else None
    ds = empty(s.shape, like=s)
    partial = None
    if wb_grad:
        G = k.num_partials(s, s.shape[0])
        partial = torch.zeros((2, G, s.shape[1]), device=s.device, dtype=torch.float32)
    k.backward(s, weight, dy.contiguous(), dsum.contiguous() if dsum is not None else None, ds, mean, rstd,
               partial[0] if partial is not None else None, partial[1] if partial is not None else None)
    if partial is None:  # fp32 placeholders, as the fake's
        return ds, s.new_empty(0, dtype=torch.float32), s.new_empty(0, dtype=torch.float32)
    # the second, deterministic stage over the G partial rows
    return ds, partial[0].sum(dim=0), partial[1].sum(dim=0)


@_layer_norm_bwd.register_fake
def _(dy, dsum, s, weight, mean, rstd, wb_grad, backend):
    n = s.shape[1] if wb_grad else 0
    return s.new_empty(s.shape), s.new_empty(n, dtype=torch.float32), s.new_empty(n, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, backend = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.has_res = residual is not None
    ctx.wdtype = weight.dtype if weight is not None else None
    ctx.bdtype = bias.dtype if bias is not None else None
    ctx.backend = backend
    ctx.eps = eps


def _backward(ctx, dy, dsum, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _backward_differentiable(ctx, s, weight, dy, dsum)
    wb_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ds, dw, db = _layer_norm_bwd(dy, dsum if ctx.has_res else None, s, weight, mean, rstd, wb_grad, ctx.backend)
    dw = dw.to(ctx.wdtype) if ctx.needs_input_grad[2] else None
    db = db.to(ctx.bdtype) if ctx.needs_input_grad[3] else None
    return ds, (ds if ctx.has_res else None), dw, db, None, None


def _backward_differentiable(ctx, s, weight, dy, dsum):
    """The gradients as torch ops of the saved input s (x or x + residual), so that they differentiate again, as
    torch.nn.LayerNorm's do (the kernels' backward differentiates once), in fp32: with ŝ = (s − mean)·rstd and
    g = dy·weight, ds = rstd·(g − mean(g) − ŝ·mean(g·ŝ)), dweight = Σ dy·ŝ, dbias = Σ dy."""
    sf, dyf = s.float(), dy.float()
    mean = sf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((sf - mean).square().mean(-1, keepdim=True) + ctx.eps)
    shat = (sf - mean) * rstd
    g = dyf * weight.float() if weight is not None else dyf
    ds = (rstd * (g - g.mean(-1, keepdim=True) - shat * (g * shat).mean(-1, keepdim=True))).to(s.dtype)
    if ctx.has_res:
        ds = ds + dsum  # s = x + residual is also an output
    dw = (dyf * shat).sum(0).to(ctx.wdtype) if ctx.needs_input_grad[2] else None
    db = dyf.sum(0).to(ctx.bdtype) if ctx.needs_input_grad[3] else None
    return ds, (ds if ctx.has_res else None), dw, db, None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _normalized(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    if isinstance(normalized_shape, (str, bytes)):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    try:  # ints only, as torch: operator.index refuses "33" and 33.0; bools are refused below
        shape = tuple(operator.index(n) for n in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if any(isinstance(n, bool) for n in normalized_shape):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    if not shape:
        raise ValueError("normalized_shape must not be empty")
    return shape


def _check(x, normalized_shape, weight, bias, residual=None, eps=1e-5):
    check_tensor(x, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    shape = _normalized(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"normalized_shape {list(shape)} does not match the trailing dims of x {tuple(x.shape)}")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            check_tensor(t, name)
            check_same(x, "x", t, name, dtype=False)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected normalized_shape {shape}")
    if residual is not None:
        check_tensor(residual, "residual")
        check_same(x, "x", residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    return shape


def _torch_takes(x, weight, bias) -> bool:
    """F.layer_norm takes weight / bias of x's dtype, and fp32 ones for fp16 / bf16 x (it refuses other mixes,
    which backend "torch" computes with the reference instead)."""
    ok = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    return all(t is None or t.dtype in ok for t in (weight, bias))


def _run(x, residual, shape, weight, bias, eps, backend):
    use = dispatch.select(backend, x, kernels_take((x, "x"), (residual, "residual"), (weight, "weight"),
                                                   (bias, "bias")))
    if use == "torch" and _torch_takes(x, weight, bias):  # torch's own kernels: bit for bit torch.nn.LayerNorm's
        s = x if residual is None else x + residual  # the sum rounded to x's dtype, as the kernels round it
        return F.layer_norm(s, shape, weight, bias, eps), (s if residual is not None else None)
    if use in REFERENCE_BACKENDS or x.numel() == 0:  # empty: an empty result, as torch (no kernel launch)
        xc, rc, wc, bc = (upcast(use, t) for t in (x, residual, weight, bias))
        if residual is None:
            return reference.layer_norm(xc, shape, wc, bc, eps).to(x.dtype), None
        y, s = reference.add_layer_norm(xc, rc, shape, wc, bc, eps, prenorm=True)
        return y.to(x.dtype), s.to(x.dtype)
    for t, name in ((x, "x"), (residual, "residual"), (weight, "weight"), (bias, "bias")):
        if t is not None:
            check_kernel_dtype(t, name, use)
    N = math.prod(shape)
    x2d = x.reshape(-1, N).contiguous()
    r2d = residual.reshape(-1, N).contiguous() if residual is not None else None
    # the kernel reads weight / bias with stride 1
    w1d = weight.reshape(N).contiguous() if weight is not None else None
    b1d = bias.reshape(N).contiguous() if bias is not None else None
    y, s, _, _ = _layer_norm_fwd(x2d, r2d, w1d, b1d, float(eps), use)
    return y.view(x.shape), (s.view(x.shape) if residual is not None else None)


def layer_norm(x: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.layer_norm`` fused: fp32 statistics, deterministic dweight/dbias."""
    if autocast_to(x, "fp32") is not None:  # as torch's CUDA autocast: x, weight and bias in fp32, an fp32 result
        x, weight, bias = (t.float() if autocast_to(t, "fp32") else t for t in (x, weight, bias))
    shape = _check(x, normalized_shape, weight, bias, eps=eps)
    return _run(x, None, shape, weight, bias, eps, backend)[0]


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: Union[int, Sequence[int]],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
                   prenorm: bool = False, *, backend: str = "auto"):
    """LayerNorm(x + residual) in one pass; with ``prenorm=True`` returns (y, x + residual). Floating x and
    residual of different dtypes are promoted first, as ``x + residual`` promotes them (under autocast a
    sublayer's fp16/bf16 output meets an fp32 residual stream)."""
    if (isinstance(x, Tensor) and isinstance(residual, Tensor) and x.dtype != residual.dtype
            and x.is_floating_point() and residual.is_floating_point()):
        common = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(common), residual.to(common)
    if autocast_to(x, "fp32") is not None:  # torch's LayerNorm(x + residual) under CUDA autocast: the sum
        # rounded to x's dtype (no autocast for an add), then the LayerNorm in fp32; unfused, as there
        _check(x, normalized_shape, weight, bias, residual, eps)
        s = x + residual
        y = layer_norm(s, normalized_shape, weight, bias, eps, backend=backend)
        return (y, s) if prenorm else y
    shape = _check(x, normalized_shape, weight, bias, residual, eps)
    y, s = _run(x, residual, shape, weight, bias, eps, backend)
    return (y, s) if prenorm else y
