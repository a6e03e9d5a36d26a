"""Triton LayerNorm (optionally of x + residual) over the last dim of [R, N] rows, forward and backward.

    s = x (+ residual, rounded to x's dtype as torch's add is),  μ = mean(s),  rstd = 1/sqrt(mean((s−μ)²) + eps)
    ŝ = (s − μ)·rstd,  y = ŝ·w + b
    backward: g = dy·w,  ds = rstd·(g − mean(g) − ŝ·mean(g·ŝ)) (+ d(sum) for prenorm),  dw = Σ_rows dy·ŝ,  db = Σ_rows dy

Forward: one program per row (rows up to MAX_BLOCK wide in registers, wider ones looped in chunks).
Backward: a fixed number G of programs, program p taking rows p, p+G, …, each accumulating its own partial
dw/db row in fp32; the caller sums the G partial rows. No atomics, so reruns are bitwise equal.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_ctx
from .softmax import block_for, warps_for


# Correctly rounded divisions and square root: on a GPU "/" and tl.sqrt compile to div.full.f32 / sqrt.approx.f32
# (up to 2 ulp each; the interpreter's numpy rounds exactly), visible in fp32 outputs. Once per row, they cost nothing.
@triton.jit
def _mean(total, N):
    return tl.math.div_rn(total, N * 1.0)  # N * 1.0: also when the JIT makes N == 1 a constant


@triton.jit
def _rstd(sum_sq, N, eps):
    """1 / sqrt(sum_sq / N + eps)."""
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(_mean(sum_sq, N) + eps))


@triton.jit
def _ln_fwd_kernel(X, Res, W, B, Y, S, Mean, Rstd, N, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    if HAS_RES:
        Res += row * N
        S += row * N
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        ok = cols < N
        x = tl.load(X + cols, mask=ok, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(Res + cols, mask=ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + cols, x, mask=ok)
        x = x.to(tl.float32)
        mean = _mean(tl.sum(x, 0), N)
        xc = tl.where(ok, x - mean, 0.0)
        rstd = _rstd(tl.sum(xc * xc, 0), N, eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=ok)
    else:
        src = X
        if HAS_RES:
            src = S
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            ok = start + cols < N
            x = tl.load(X + start + cols, mask=ok, other=0.0)
            if HAS_RES:
                x = (x.to(tl.float32) + tl.load(Res + start + cols, mask=ok, other=0.0).to(tl.float32)
                     ).to(S.dtype.element_ty)
                tl.store(S + start + cols, x, mask=ok)
            acc += x.to(tl.float32)
        mean = _mean(tl.sum(acc, 0), N)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            ok = start + cols < N
            xc = tl.where(ok, tl.load(src + start + cols, mask=ok, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
        rstd = _rstd(tl.sum(acc, 0), N, eps)
        for start in range(0, N, BLOCK):
            ok = start + cols < N
            y = (tl.load(src + start + cols, mask=ok, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + start + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + start + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd_kernel(S, W, DY, DSum, DX, Mean, Rstd, DWp, DBp, R, N, HAS_W: tl.constexpr, HAS_DSUM: tl.constexpr,
                   WB_GRAD: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    DWp += pid.to(tl.int64) * N
    DBp += pid.to(tl.int64) * N
    if SINGLE:
        ok = cols < N
        w = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_W:
            w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], tl.float32)
        db = tl.zeros([BLOCK], tl.float32)
        for r in range(pid, R, G):
            row = tl.cast(r, tl.int64)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(ok, (tl.load(S + row * N + cols, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dy = tl.load(DY + row * N + cols, mask=ok, other=0.0).to(tl.float32)
            g = dy * w
            dx = (g - _mean(tl.sum(g, 0), N) - xhat * _mean(tl.sum(g * xhat, 0), N)) * rstd
            if HAS_DSUM:
                dx += tl.load(DSum + row * N + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=ok)
            dw += dy * xhat
            db += dy
        if WB_GRAD:
            tl.store(DWp + cols, dw, mask=ok)
            tl.store(DBp + cols, db, mask=ok)
    else:
        for r in range(pid, R, G):
            row = tl.cast(r, tl.int64)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            acc_g = tl.zeros([BLOCK], tl.float32)
            acc_gx = tl.zeros([BLOCK], tl.float32)
            for start in range(0, N, BLOCK):
                ok = start + cols < N
                xhat = (tl.load(S + row * N + start + cols, mask=ok, other=0.0).to(tl.float32) - mean) * rstd
                g = tl.load(DY + row * N + start + cols, mask=ok, other=0.0).to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + start + cols, mask=ok, other=0.0).to(tl.float32)
                acc_g += g
                acc_gx += tl.where(ok, g * xhat, 0.0)
            c_g = _mean(tl.sum(acc_g, 0), N)
            c_gx = _mean(tl.sum(acc_gx, 0), N)
            for start in range(0, N, BLOCK):
                ok = start + cols < N
                xhat = (tl.load(S + row * N + start + cols, mask=ok, other=0.0).to(tl.float32) - mean) * rstd
                dy = tl.load(DY + row * N + start + cols, mask=ok, other=0.0).to(tl.float32)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + start + cols, mask=ok, other=0.0).to(tl.float32)
                dx = (g - c_g - xhat * c_gx) * rstd
                if HAS_DSUM:
                    dx += tl.load(DSum + row * N + start + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(DX + row * N + start + cols, dx.to(DX.dtype.element_ty), mask=ok)
                if WB_GRAD:  # this program's own partial row: read-modify-write without races
                    tl.store(DWp + start + cols, tl.load(DWp + start + cols, mask=ok, other=0.0) + dy * xhat, mask=ok)
                    tl.store(DBp + start + cols, tl.load(DBp + start + cols, mask=ok, other=0.0) + dy, mask=ok)


def num_partials(x: torch.Tensor, rows: int) -> int:
    """G, the number of backward programs (and partial dw/db rows): a few per SM, fixed per device."""
    per_device = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    return max(1, min(rows, per_device))


def forward(x2d, res2d, w, b, y2d, s2d, mean, rstd, eps: float):
    """Rows of x2d (+ res2d, stored to s2d) normalised into y2d; saves mean and rstd (fp32 [R])."""
    R, N = x2d.shape
    block, single = block_for(N)
    with device_ctx(x2d):
        _ln_fwd_kernel[(R,)](x2d, res2d if res2d is not None else x2d, w if w is not None else x2d,
                             b if b is not None else x2d, y2d, s2d if s2d is not None else y2d, mean, rstd, N, eps,
                             HAS_RES=res2d is not None, HAS_W=w is not None, HAS_B=b is not None, BLOCK=block,
                             SINGLE=single, num_warps=warps_for(block))


def backward(s2d, w, dy2d, dsum2d, dx2d, mean, rstd, dw_partial, db_partial):
    """dx2d from the normalised rows s2d; dw/db partial sums ([G, N] fp32, zeroed, or None) per program."""
    R, N = s2d.shape
    block, single = block_for(N)
    G = dw_partial.shape[0] if dw_partial is not None else num_partials(s2d, R)
    with device_ctx(s2d):
        _ln_bwd_kernel[(G,)](s2d, w if w is not None else s2d, dy2d, dsum2d if dsum2d is not None else dy2d, dx2d,
                             mean, rstd, dw_partial if dw_partial is not None else mean,
                             db_partial if db_partial is not None else mean, R, N, HAS_W=w is not None,
                             HAS_DSUM=dsum2d is not None, WB_GRAD=dw_partial is not None, BLOCK=block,
                             SINGLE=single, num_warps=warps_for(block))
