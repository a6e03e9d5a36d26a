"""Triton softmax over the last dim of a [R, N] row-major view, forward and backward, fp32 accumulation (the sums
in fp64 for fp32 rows, _acc).

    z = x·scale + mask,   y = exp(z − max z) / Σ exp(z − max z)   (a row of −inf gives y = 0, not NaN)
    dz = y ⊙ (dy − Σ y·dy),   dx = scale·dz,   dmask = dz (summed over the mask's broadcast dims by the caller)

One program per row. Rows up to MAX_BLOCK wide are held in registers (one read, one write); wider rows are
looped in MAX_BLOCK chunks with an online max/sum (two reads, one write).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_ctx

MAX_BLOCK = 8192


def block_for(n: int) -> tuple[int, bool]:
    """(BLOCK, SINGLE) for a row of n elements."""
    block = min(triton.next_power_of_2(max(n, 1)), MAX_BLOCK)
    return block, n <= block


def warps_for(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 4096 else 16


@triton.jit
def _row_mask_offset(row, D1, D2, s_m0, s_m1, s_m2):
    """Offset of row (i0, i1, i2) of a [D0, D1, D2, N] problem in a mask with broadcast (0) strides."""
    i2 = row % D2
    i1 = (row // D2) % D1
    i0 = row // (D1 * D2)
    return i0 * s_m0 + i1 * s_m1 + i2 * s_m2


@triton.jit
def _acc(x, Ref):
    """x as summed: in fp64 when the row (Ref's elements) is fp32 (as the CUDA kernels do), else fp32. In fp32 a
    row whose one dominant term is ≈ 1 lost ~8 ulp of its sum in the interpreter's order (a GPU's tree order is
    another, unmeasured), past torch's vectorised fp32 sum, the rule's baseline."""
    acc = x  # one return: the compiler wants one return type even where the condition is static
    if Ref.dtype.element_ty == tl.float32:
        acc = x.to(tl.float64)
    return acc


@triton.jit
def _load_z(X, Mask, cols, ok, scale, HAS_MASK: tl.constexpr):
    z = tl.load(X + cols, mask=ok, other=float("-inf")).to(tl.float32) * scale
    if HAS_MASK:
        z += tl.load(Mask + cols, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(X, Y, Mask, N, D1, D2, s_m0, s_m1, s_m2, scale,
                        HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    if HAS_MASK:
        Mask += _row_mask_offset(row, D1, D2, s_m0, s_m1, s_m2)
    cols = tl.arange(0, BLOCK)
    # IEEE divisions (div_rn): on a GPU "/" compiles to div.full.f32, up to 2 ulp, visible in fp32 outputs
    if SINGLE:
        z = _load_z(X, Mask, cols, cols < N, scale, HAS_MASK)
        m = tl.max(z, 0)
        e = tl.exp(z - tl.where(m == float("-inf"), 0.0, m))  # a −inf row: e = 0, l = 0, y = 0
        l = tl.sum(_acc(e, X), 0).to(tl.float32)
        tl.store(Y + cols, tl.math.div_rn(e, tl.where(l == 0.0, 1.0, l)).to(Y.dtype.element_ty), mask=cols < N)
    else:
        # per-lane running max and sum, merged at the end: no scalar loop-carried state
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        l_vec = _acc(tl.zeros([BLOCK], tl.float32), X)
        for start in range(0, N, BLOCK):
            z = _load_z(X + start, Mask + start, cols, start + cols < N, scale, HAS_MASK)
            m_new = tl.maximum(m_vec, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_vec = l_vec * tl.exp(m_vec - m_safe) + tl.exp(z - m_safe)
            m_vec = m_new
        m = tl.max(m_vec, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(l_vec * tl.exp(m_vec - m_safe), 0).to(tl.float32)
        l = tl.where(l == 0.0, 1.0, l)
        for start in range(0, N, BLOCK):
            ok = start + cols < N
            z = _load_z(X + start, Mask + start, cols, ok, scale, HAS_MASK)
            tl.store(Y + start + cols, tl.math.div_rn(tl.exp(z - m_safe), l).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, DZ, N, scale, STORE_DZ: tl.constexpr, BLOCK: tl.constexpr,
                        SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    Y += row * N
    DY += row * N
    DX += row * N
    DZ += row * N
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        ok = cols < N
        y = tl.load(Y + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=ok, other=0.0).to(tl.float32)
        # dy − Σ y·dy cancels where one y dominates: formed in fp64 too for fp32 rows
        dz = (_acc(y, Y) * (_acc(dy, Y) - tl.sum(_acc(y, Y) * dy, 0))).to(tl.float32)
        tl.store(DX + cols, (dz * scale).to(DX.dtype.element_ty), mask=ok)
        if STORE_DZ:
            tl.store(DZ + cols, dz, mask=ok)
    else:
        acc = _acc(tl.zeros([BLOCK], tl.float32), Y)
        for start in range(0, N, BLOCK):
            ok = start + cols < N
            y = tl.load(Y + start + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=ok, other=0.0).to(tl.float32)
            acc += _acc(y, Y) * dy
        dot = tl.sum(acc, 0)
        for start in range(0, N, BLOCK):
            ok = start + cols < N
            y = tl.load(Y + start + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=ok, other=0.0).to(tl.float32)
            dz = (_acc(y, Y) * (_acc(dy, Y) - dot)).to(tl.float32)
            tl.store(DX + start + cols, (dz * scale).to(DX.dtype.element_ty), mask=ok)
            if STORE_DZ:
                tl.store(DZ + start + cols, dz, mask=ok)


def forward(x2d: torch.Tensor, y2d: torch.Tensor, mask4d, scale: float, lead: tuple[int, int, int]):
    """x2d, y2d: contiguous [R, N]. mask4d: None or a [D0|1, D1|1, D2|1, N] float view (stride-1 last dim)
    broadcast over the leading dims ``lead`` = (D0, D1, D2) with D0·D1·D2 = R."""
    R, N = x2d.shape
    block, single = block_for(N)
    strides = (0, 0, 0)
    if mask4d is not None:
        strides = tuple(0 if n == 1 else s for n, s in zip(mask4d.shape[:3], mask4d.stride()[:3]))
    with device_ctx(x2d):
        _softmax_fwd_kernel[(R,)](x2d, y2d, mask4d if mask4d is not None else x2d, N, lead[1], lead[2], *strides,
                                  scale, HAS_MASK=mask4d is not None, BLOCK=block, SINGLE=single,
                                  num_warps=warps_for(block))


def backward(y2d, dy2d, dx2d, dz2d, scale: float):
    """dx2d = scale·dz; dz2d (fp32 [R, N] or None) receives dz for a mask gradient."""
    R, N = y2d.shape
    block, single = block_for(N)
    with device_ctx(y2d):
        _softmax_bwd_kernel[(R,)](y2d, dy2d, dx2d, dz2d if dz2d is not None else dx2d, N, scale,
                                  STORE_DZ=dz2d is not None, BLOCK=block, SINGLE=single,
                                  num_warps=warps_for(block))
