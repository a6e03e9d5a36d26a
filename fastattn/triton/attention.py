"""Triton fused attention, FlashAttention-2 algorithm: forward, and a backward in two passes without atomics.

Notation (per batch b, query head h, kv head h // GROUP):
    s_ij = scale · q_i·k_j + bias_ij,   visible(i, j) from causal / kv_lens / bool mask,
    p_ij = exp(s_ij − lse_i) on visible entries,  lse_i = log Σ_j exp(s_ij),  o_i = Σ_j p_ij v_j.
The forward keeps a running max and sum (online softmax) and saves lse2 = lse·log2(e) (fp32, +inf for a row
with no visible key, whose output is 0). fp16/bf16 work in base 2: the backward recomputes p = exp2(s·log2(e) −
lse2) with no change of base, so a row with one visible key gets p = 1 exactly. fp32 keeps s in natural units
(rounding s·log2(e) errs by |s|·2⁻²⁴ in the exponent): p = c_i·exp(s − lse2·ln 2), c_i = 1 / Σ_j exp(s_ij −
lse2_i·ln 2) from the D pass, so lse2's rounding cancels (see _row_stats). The backward uses
    D_i = Σ_d do_id·o_id − log2(e)·dlse2_i,   ds_ij = p_ij (do_i·v_j − D_i),
(fp16/bf16 training: o_i = out_i + out_lo_i, the output and what rounding it dropped, stored by the forward: see
_bwd_delta_kernel; for fp32, D_i = Σ_j p_ij dp_ij / Σ_j p_ij − log2(e)·dlse2_i from the recomputed p and dp, in
fp64: see dq; kept in fp64 and used as two fp32 parts: see _row_stats),
    dv_j = Σ_i p_ij do_i,   dk_j = scale Σ_i ds_ij q_i,   dq_i = scale Σ_j ds_ij k_j,   dbias_ij = ds_ij,
with one program per key block for dk/dv (looping over the query heads of its GQA group, so no atomics)
and one program per query block for dq: reruns are bitwise identical. The dk/dv program works on transposed
tiles (sᵀ = k·qᵀ, dpᵀ = v·doᵀ, as Triton's fused-attention tutorial does), so that no dot result is transposed
into another dot: tl.dot(tl.trans(<dot result>), x) has reported miscompiles on Hopper (triton-lang/triton#6124).
A full-size bias gets ds from the dk/dv kernel; a bias broadcast over some dims gets dbias = Σ ds over them from
a kernel of its own (one program per dbias tile), so no [B, H, Lq, Lk] buffer is ever allocated.
When its programs are too few to fill the GPU (decoding), the forward splits each one's keys over several programs
and merges their results by their log-sum-exps (split-KV, see num_splits); when a query block would hold few
rows, it packs the query heads of a GQA group into one program's rows (see pack_gqa).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..ops.common import empty
from . import device_ctx

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------- autotuning
# The interpreter runs programs one by one in numpy: one fixed config. The delta kernel uses the same block as
# the dq / dk-dv kernels (their dots must round alike, see _bwd_delta_kernel and fastattn/triton/__init__.py).
INTERPRET_BLOCK = 32
DELTA_BLOCK = INTERPRET_BLOCK if INTERPRET else 64


# Tiles (BLOCK_M, BLOCK_N, warps, stages) per kernel, input element size (2: fp16/bf16; 4: fp32, whose "ieee" dots
# run on the FMA units with both operand tiles in registers) and head-dim block (16 uses 32's). In the dK/dV kernel
# BLOCK_N is the program's key block and BLOCK_M the query step; in the others BLOCK_M is the program's query block.
# Autotuning tries the list; the first entry is the untuned default (FASTATTN_AUTOTUNE=0, the benchmarks' default).
# Each entry compiles for sm_90 without spilling registers (causal attention with kv_lens, specialised as for
# contiguous inputs: 16-divisible pointers and strides; measured by tests/aot_compile.py with cuobjdump, which fails
# on a spill; at d64 and d128 the fp16 defaults also with a bias and its gradient, a bool mask, dropout or a soft
# cap). Larger tiles spill: e.g. fp16 d256 dK/dV at 64x64 (208 B of stack), fp32 d64 dK/dV at 64x64 (1.1 KB); fp16
# d128 dK/dV at 64x64 spills 24-168 B with any of those features. At d256 a bool mask spills in every wgmma tile.
# The fp16 defaults run their dots on Hopper's wgmma, which needs 64 rows per warpgroup (the dK/dV kernel's dots have
# BLOCK_N rows, the others' BLOCK_M); smaller tiles, kept for small problems, use mma.sync.
_TILES = {
    "fwd": {
        2: {32: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (32, 32, 4, 2)],
            64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
            128: [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
            256: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)]},
        # fp32's second accumulator (_two_sum) made 64x32 spill 16 B at d64, and 32x64 / 16x64 176-248 B at d128;
        # without FMA contraction (FP32_OPTIONS) 32x32 spills 16 B at d128
        4: {32: [(32, 64, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
            64: [(32, 64, 8, 2), (64, 16, 8, 2), (16, 64, 4, 2), (16, 16, 4, 2)],
            128: [(32, 16, 8, 2), (16, 32, 8, 2), (64, 16, 8, 2), (16, 16, 2, 2)],
            256: [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)]},
    },
    "dkdv": {
        2: {32: [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2)],
            64: [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2)],
            128: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 32, 8, 3), (32, 32, 4, 2), (16, 32, 4, 2)],
            256: [(16, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)]},
        4: {32: [(32, 32, 8, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 2, 2)],
            64: [(32, 16, 4, 2), (16, 16, 4, 2)],
            128: [(32, 32, 8, 2), (16, 16, 4, 2)],
            256: [(16, 16, 8, 2)]},
    },
    "dq": {
        2: {32: [(128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
            64: [(128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
            128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 8, 3), (32, 32, 4, 2)],
            256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2), (32, 16, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)]},
        # 64x32 with 8 warps spills 24-32 B at d64 / d128 since D is held as two fp32 parts (_row_stats); 32x64
        # 56 B at d128 since dq has a second accumulator (_two_sum)
        4: {32: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
            64: [(64, 16, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
            128: [(64, 16, 8, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
            # 32x32 spills 8-9 KB (at 32 registers) with a bool mask and a window; 32x16 in no case measured
            256: [(32, 16, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)]},
    },
    # The dq kernel's D pass (DELTA_PASS, fp32 only). Without the dq dot, the dq tiles spill at d128 and d256
    # (255 registers and 0.5 KB of stack; 3.4 KB), and so do 64x32 at d128 with 4 warps and 32x16 at d256.
    "delta": {
        4: {32: [(64, 32, 8, 2), (64, 16, 8, 2)],
            64: [(64, 32, 8, 2), (64, 16, 8, 2)],
            128: [(64, 16, 8, 2), (32, 32, 8, 2)],
            256: [(16, 32, 8, 2), (16, 16, 4, 2)]},
    },
}


def _tile(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _configs(kernel):
    """Every tile of the kernel's table, once (the autotuner's list, which _prune narrows per call)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}, num_warps=4, num_stages=1)]
    tiles = dict.fromkeys(t for by_size in _TILES[kernel].values() for tiles in by_size.values() for t in tiles)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def tiles_for(kernel, element_size, block_d):
    """The table's tiles for kernel "fwd" / "dkdv" / "dq" / "delta" (fp32 only), in order (the first is the
    untuned default)."""
    return _TILES[kernel][4 if element_size >= 4 else 2][max(32, block_d)]


_SMEM_BUDGET = 200 * 1024  # bytes; H100/H200 allow 227 KB per block, leave room for the compiler's scratch


def _prune(kernel, configs, named_args, **kwargs):
    """The configs of the table for this dtype and head-dim block, in its order, that fit the shared-memory
    budget (estimate; the smallest tile if none does)."""
    if INTERPRET:
        return configs
    bd = kwargs["BLOCK_D"] if "BLOCK_D" in kwargs else named_args["BLOCK_D"]
    esize = named_args["Q"].element_size()
    by_tile = {_tile(c): c for c in configs}
    chosen = [by_tile[t] for t in tiles_for(kernel, esize, bd)]
    keep = [c for c in chosen if esize * bd * (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"] * c.num_stages)
            + 4 * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _SMEM_BUDGET]
    return keep or [min(chosen, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def autotune_enabled() -> bool:
    """FASTATTN_AUTOTUNE=0 skips benchmarking configs: one compile per kernel (tests, quick runs)."""
    return not INTERPRET and os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


_FORCED: dict = {}  # kernel -> triton.Config, while forced_configs() is active


@contextlib.contextmanager
def forced_configs(fwd=None, dkdv=None, dq=None):
    """Launch the given kernels with one triton.Config each (no autotuning), e.g. to test every config."""
    chosen = {_fwd_kernel: fwd, _bwd_dkdv_kernel: dkdv, _bwd_dq_kernel: dq}
    _FORCED.update({kernel: c for kernel, c in chosen.items() if c is not None})
    try:
        yield
    finally:
        _FORCED.clear()


def configs_for(kernel_name, q, head_dim):
    """The configs of kernel "fwd" / "dkdv" / "dq" that survive pruning for q's dtype and head_dim."""
    kernel = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kernel_name]
    return _prune(kernel_name, kernel.configs, {"Q": q}, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


_TOO_BIG: set = set()  # (kernel, device, constexprs, tile) that raised OutOfResources: not tried again


def _launch(kernel, grid, *args, **kwargs):
    """Launch with the forced config, or autotuned, or (FASTATTN_AUTOTUNE=0) with the first pruned config that the
    GPU can run: a tile whose features (a bool mask, a bias) take more shared memory than the device has (A100:
    163 KB) falls back to the next, as the autotuner skips it."""
    forced = _FORCED.get(kernel)
    if forced is not None:
        return kernel.fn[grid](*args, **kwargs, **forced.all_kwargs())
    if autotune_enabled():
        return kernel[grid](*args, **kwargs)
    configs = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)
    device = args[0].device
    flags = tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper()))
    for i, config in enumerate(configs):
        key = (kernel, device, flags, _tile(config))
        if key in _TOO_BIG and i < len(configs) - 1:
            continue
        try:
            return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
        except triton.runtime.errors.OutOfResources:
            if i == len(configs) - 1:
                raise
            _TOO_BIG.add(key)


# Compile options of the fp32 kernels: Triton contracts x·y + z into one FMA by default (and ptxas does too), which
# the interpreter never does. The fp32 kernels' numerics were built and checked on separately rounded steps
# (TwoSum's exact error term in _two_sum, _exp_neg's reduction, D split in two parts), so on a GPU they compile
# without contraction, and round as the interpreter does except in the dots' own sums. (The H200's one fp32
# failure of a one-key case, test_gpu_matrix[64-1-1-float32] on 2026-11-23, came from an earlier fp32 path; its
# cause is unknown.) fp16/bf16, whose rounding dwarfs an FMA's, keep the contraction, for speed.
FP32_OPTIONS = {"enable_fp_fusion": False}


def _options(args: dict) -> dict:
    """The compile options in a launch's ``args`` (_common's), for a kernel launched with only some of them."""
    return {k: v for k, v in args.items() if k in FP32_OPTIONS}


# Tuned per power-of-two bucket of the lengths (new lengths in a bucket reuse the tuned config), and the
# lengths are not specialised on, so a new length compiles nothing.
_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "WIN_LEFT", "WIN_RIGHT", "HAS_BIAS", "HAS_MASK", "GROUP", "VARLEN",
        "DROPOUT"]
_NOSPEC = ["Lq", "Lk", "Q_BUCKET", "K_BUCKET", "seed", "drop_Lq", "drop_Lk", "drop_base", "shift0"]


# --------------------------------------------------------------------------------------------- shared pieces
@triton.jit
def _extent(CuQ, CuK, KvLens, b, Lq, Lk, shift0, VARLEN: tl.constexpr, HAS_KVLENS: tl.constexpr,
            BOTTOM_RIGHT: tl.constexpr):
    """Sequence b's (first query row, first key row, query rows, key rows, valid keys, diagonal shift d(i) − i).
    Packed varlen: rows cu[b] .. cu[b+1] of the packed tensors; else the whole [Lq] / [Lk] of batch b. ``shift0``
    (0 but for a block of a larger problem, context parallelism: its first row's position minus its first key's)
    moves the top-left diagonal."""
    if VARLEN:
        q0 = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q0
        k0 = tl.load(CuK + b)
        k_len = tl.load(CuK + b + 1) - k0
    else:
        q0 = 0
        q_len = Lq
        k0 = 0
        k_len = Lk
    kv_len = k_len
    if HAS_KVLENS:
        kv_len = tl.minimum(tl.load(KvLens + b), k_len)
    shift = shift0
    if BOTTOM_RIGHT:
        shift += kv_len - q_len
    return q0, k0, q_len, k_len, kv_len, shift


@triton.jit
def _load_rows(ptr, rows, s_row, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    """[len(rows), BLOCK_D] tile of a matrix with row stride s_row and contiguous columns, from ptr (its row 0);
    rows >= n_rows and columns >= HEAD_DIM read as 0."""
    return tl.load(ptr + rows[:, None] * s_row + offs_d[None, :],
                   mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _row_stats(Lse, Delta, Scale, rows, row_ok, ACCURATE: tl.constexpr, SCALED: tl.constexpr):
    """(r, D, D_lo, c) of the given rows, for the recomputed weights p_ij = c_i·exp(s_ij − r_i) (_exp_scores) and
    ds_ij = p_ij·((dp_ij − D_i) − D_lo_i) (_ds). fp16/bf16: r = lse2, D from the fp32 Delta, D_lo = 0, c = 1.
    fp32 (ACCURATE): r = lse2·ln(2), natural as the scores; the fp64 Delta split into D + D_lo (fp32 each), so that
    dp − D is exact where dp is near D (a row with one visible key: D = dp − dlse, and fp32 D's rounding, up to
    ulp(dp), would swamp a small dlse); with SCALED (all but the D pass, which writes it) c_i = 1 / Σ_j
    e^(s_ij − r_i) from the D pass (see _bwd_dq_kernel): r's rounding, a relative error of up to |lse|·2⁻²⁴ that
    every weight of a row shares, cancels. r = +inf past the rows: p = 0 there."""
    lse = tl.load(Lse + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
    if ACCURATE:  # the op's fp64 Lse: r = lse2·ln 2 rounded once (a caller's fp32 one: in fp32)
        lse = (lse * 0.6931471805599453).to(tl.float32)
        hi = delta.to(tl.float32)
        lo = (delta - hi.to(tl.float64)).to(tl.float32)
        if SCALED:
            return lse, hi, lo, tl.load(Scale + rows, mask=row_ok, other=0.0)
        else:
            return lse, hi, lo, tl.zeros_like(lse) + 1.0
    else:
        return lse, delta, tl.zeros_like(lse), tl.zeros_like(lse) + 1.0


@triton.jit
def _ds(p, dp, delta, delta_lo, ACCURATE: tl.constexpr, DROPOUT: tl.constexpr):
    """ds = p·(dp − D), D = delta + delta_lo (_row_stats; broadcast like p). fp16/bf16 with dropout: 0 where p = 1
    exactly, where ds_ij = p_ij Σ_{k≠j} p_ik (dp_ij − dp_ik) lies below fp32's resolution; in a row with one visible
    key it is exactly 0, but dp − D would keep a rounding: dp = r·(do·v) (_kept_dp), D from o = r·v rounded."""
    if ACCURATE:
        return p * ((dp - delta) - delta_lo)
    elif DROPOUT:
        return tl.where(p == 1.0, 0.0, p * (dp - delta))
    else:
        return p * (dp - delta)


@triton.jit
def _times_pow2(p, n):
    """p·2^n for integral n in [−127, 128] (fp32), by building 2^n's exponent bits: n = −127 gives +0."""
    return p * ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exp2(x, ACCURATE: tl.constexpr):
    """2^x (the split-KV merge's weights); ACCURATE (fp32 inputs): within about 1 ulp, where tl.math.exp2 compiles
    to ex2.approx.f32 (up to 2 ulp; with that error the interpreter's fp32 dv missed the rule, README Numerics);
    0 for x < −126.5.
    2^x = 2^n · 2^f, n = round(x), f = x − n in [−1/2, 1/2] (exact), 2^f by its Taylor series to f^7 (truncation
    < 6e-9 relative), 2^n by building the exponent bits: x <= −127 gives the bits of +0."""
    if ACCURATE:
        xc = tl.maximum(x, -127.0)
        n = tl.floor(xc + 0.5)
        f = xc - n
        p = 1.5252733804059838e-05 * f + 0.00015403530393381606
        p = p * f + 0.0013333558146428441
        p = p * f + 0.009618129107628477
        p = p * f + 0.055504108664821576
        p = p * f + 0.2402265069591007
        p = p * f + 0.6931471805599453
        p = p * f + 1.0
        return _times_pow2(p, n)
    else:
        return tl.math.exp2(x)


@triton.jit
def _exp_neg(x, ACCURATE: tl.constexpr):
    """e^x for x <= 0; ACCURATE (fp32): within about 1 ulp, where tl.exp is ex2.approx.f32 of the rounded x·log2(e)
    (an error that grows with |x|); 0 for x < −87.7. e^x = 2^n · e^r, n = round(x·log2(e)), r = x − n·ln2 with
    ln2 split Cody–Waite style (n·LN2_HI is exact: its last 9 mantissa bits are 0), |r| <= ln2/2, e^r by its
    Taylor series to r^8 (truncation < 3e-10 relative), 2^n by building the exponent bits."""
    if ACCURATE:
        xc = tl.maximum(x, -88.0)
        n = tl.floor(xc * 1.4426950408889634 + 0.5)
        r = (xc - n * 0.693145751953125) - n * 1.428606765330187e-06
        p = 2.48015873015873e-05 * r + 0.0001984126984126984
        p = p * r + 0.001388888888888889
        p = p * r + 0.008333333333333333
        p = p * r + 0.041666666666666664
        p = p * r + 0.16666666666666666
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        return _times_pow2(p, n)
    else:
        return tl.exp(x)


@triton.jit
def _exp_scores(x, ACCURATE: tl.constexpr):
    """The softmax weight of a score difference x (<= 0, up to rounding): e^x for fp32 (ACCURATE), whose scores
    stay in natural units (see _scores), 2^x for fp16/bf16 (ex2.approx), whose scores are in base 2."""
    if ACCURATE:
        return _exp_neg(x, ACCURATE)
    else:
        return tl.math.exp2(x)


@triton.jit
def _div(a, b, ACCURATE: tl.constexpr):
    """a / b; ACCURATE (fp32): correctly rounded, where "/" compiles to div.full.f32 (up to 2 ulp)."""
    if ACCURATE:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _two_sum(acc, acc_lo, x):
    """(acc + x, acc_lo + the rounding error of that sum) (Knuth's TwoSum, exact in fp32): the fp32 kernels'
    running sums over blocks (out, dq, dk, dv) err like one block's dot, not like one sequential sum of all the
    blocks' products. On a GPU Triton folds `acc + tl.dot(a, b)` into the dot's accumulator (its Combine pass; the
    interpreter never does), and an fp32 dot is a chain of FMAs, so without this dK/dV summed Lq·group products in
    one fp32 chain and missed the §5 rule by up to 2.5 times (emulated on the CPU, README Numerics). x's second use
    here also keeps the fold from happening. fp16/bf16 keep the fold: the MMAs' own fp32 accumulators."""
    s = acc + x
    x_part = s - acc
    return s, acc_lo + ((acc - (s - x_part)) + (x - x_part))


@triton.jit
def _kept_dp(dp, keep, keep_scale, ACCURATE: tl.constexpr):
    """dp_ij = keep_ij·r·do_i·v_j with dropout, from do_i·v_j (r = 1 / keep_scale, the forward's). fp32 (ACCURATE):
    V already holds r·v rounded as the forward rounds its output (fastattn.ops.attention._dp_values), so that a row
    with one visible key cancels exactly in dp − D with D = do_i·o_i. fp16/bf16: r·(do_i·v_j) in fp32, since their D
    holds o's rounding (see _bwd_delta_kernel): dp from r·v rounded to fp16/bf16 would err by as much."""
    if ACCURATE:
        return tl.where(keep, dp, 0.0)
    else:
        return tl.where(keep, dp * tl.math.div_rn(1.0, keep_scale), 0.0)


@triton.jit
def _keep(seed, dropout_p, bh, qi, kj, Lq, Lk, base):
    """Dropout keep-mask of the tile: Philox uniform u(seed, counter) >= p, one counter per (b, h, i, j)
    (Lq, Lk: the padded extents, max_seqlen for packed batches), so every pass regenerates the same mask.
    qi, kj: query and key indices as broadcastable 2-d tiles ([M, 1] and [1, N], or transposed). ``base``
    (i0·Lk + j0) places a block of a larger problem at its rows i0 and keys j0 (context parallelism), whose mask
    is then the whole problem's."""
    counter = (bh.to(tl.int64) * Lq + qi) * Lk + kj + base
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _key_range(q_first, q_last, kv_len, shift, win_left, win_right, WIN_LEFT: tl.constexpr,
               WIN_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys some query q_first <= i <= q_last can see; lo is block-aligned.
    Row i sees d(i) − left <= j <= d(i) + right, d(i) = i + shift."""
    lo = 0
    hi = kv_len
    if WIN_RIGHT:
        hi = tl.maximum(tl.minimum(hi, q_last + 1 + shift + win_right), 0)
    if WIN_LEFT:
        lo = tl.maximum(q_first + shift - win_left, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, Lq, shift, win_left, win_right, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the query rows that can see some key of the block starting at start_n; lo is block-aligned."""
    lo = 0
    hi = Lq
    if WIN_RIGHT:  # j <= i + shift + right  <=>  i >= j − shift − right
        lo = tl.maximum(start_n - shift - win_right, 0) // BLOCK_M * BLOCK_M
    if WIN_LEFT:  # j >= i + shift − left  <=>  i <= j − shift + left
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - shift + win_left, 0), Lq)
    return lo, hi


@triton.jit
def _visible(qi, kj, b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift, win_left, win_right,
             WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr):
    """Bool tile: query qi may attend to key kj (broadcastable index tiles: [M, 1] and [1, N] give an [M, N]
    tile, [1, M] and [N, 1] its transpose)."""
    vis = (qi < Lq) & (kj < kv_len)
    if WIN_RIGHT:
        vis = vis & (kj <= qi + shift + win_right)
    if WIN_LEFT:
        vis = vis & (kj >= qi + shift - win_left)
    if HAS_MASK:
        mk = tl.load(Mask + b * s_mb + h * s_mh + qi * s_mm + kj * s_mn, mask=(qi < Lq) & (kj < Lk), other=0)
        vis = vis & (mk != 0)
    return vis


@triton.jit
def _block_seen(start, fixed, b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift, win_left, win_right,
                WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, KEYS: tl.constexpr, STEP: tl.constexpr):
    """Whether some pair of the tile (fixed rows × the STEP keys from start, or with KEYS false, fixed keys × the
    STEP queries from start) is visible."""
    offs = start + tl.arange(0, STEP)
    if KEYS:
        vis = _visible(fixed[:, None], offs[None, :], b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift,
                       win_left, win_right, WIN_LEFT, WIN_RIGHT, True)
    else:
        vis = _visible(offs[None, :], fixed[:, None], b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift,
                       win_left, win_right, WIN_LEFT, WIN_RIGHT, True)
    return tl.max(vis.to(tl.int32)) > 0


@triton.jit
def _mask_trim(lo, hi, fixed, b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift, win_left, win_right,
               WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr, KEYS: tl.constexpr, STEP: tl.constexpr):
    """[lo, hi) (lo STEP-aligned) narrowed to the blocks from the first to the last one that a bool mask leaves
    some pair of visible. The blocks a mask hides at either end (padding, the far side of a causal or banded mask)
    are never loaded, and the loop over the rest needs no branch to skip blocks: a branch around the loads keeps
    Triton from pipelining them (no cp.async, measured with tests/aot_compile.py)."""
    while (lo < hi) & ~_block_seen(lo, fixed, b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift, win_left,
                                   win_right, WIN_LEFT, WIN_RIGHT, KEYS, STEP):
        lo += STEP
    last = lo + tl.maximum(hi - lo - 1, 0) // STEP * STEP
    while (last > lo) & ~_block_seen(last, fixed, b, h, Mask, s_mb, s_mh, s_mm, s_mn, Lq, Lk, kv_len, shift,
                                     win_left, win_right, WIN_LEFT, WIN_RIGHT, KEYS, STEP):
        last -= STEP
    return lo, tl.minimum(hi, last + STEP)


@triton.jit
def _scores(qk, vis, qi, kj, b, h, Bias, s_bb, s_bh, s_bm, s_bn, Lq, Lk, sm_scale, shift, slope, softcap,
            HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACCURATE: tl.constexpr):
    """(s·log2(e), or for fp32 (ACCURATE) s itself, with invisible entries at −inf,  the soft cap's derivative
    1 − tanh² (or 1)), where s = cap(scale·q·k) + bias − slope·|d(i) − j|, cap(x) = c·tanh(x/c). qk: the tile of
    q_i·k_j, laid out as the index tiles qi, kj are (see _visible). fp32 keeps s natural: rounding s·log2(e) errs
    by |s|·2⁻²⁴ in the exponent, which at large logits (|s| ~ 100) missed the §5 rule several times over; the
    differences s − m (m the row's max or log-sum-exp) that the weights take are exact near m instead."""
    qk = qk * sm_scale
    dcap = 1.0
    if HAS_SOFTCAP:
        # With a = |x|, u = 2 / (exp(2a) + 1): tanh(a) = 1 − u and 1 − tanh² = u (2 − u). Forming the derivative
        # from u, not as 1 − t², keeps its relative precision where t → ±1 (large logits); exp(2a) = inf gives
        # exactly t = ±1, derivative 0.
        # Below |x| = 0.3, where 1 − u cancels, tanh's Taylor series to x¹¹ (next term < 1e-9 relative).
        # ACCURATE (fp32): u = 2e / (1 + e), e = exp(−2a) <= 1, each step within about an ulp.
        if ACCURATE:
            x = tl.math.div_rn(qk, softcap)
            e = _exp_neg(-2.0 * tl.abs(x), ACCURATE)
            u = tl.math.div_rn(2.0 * e, 1.0 + e)
        else:
            x = qk / softcap
            u = 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835 + x2 * (
            -1382.0 / 155925))))))
        t = tl.where(x2 < 0.09, series, tl.where(x < 0, u - 1.0, 1.0 - u))
        qk = softcap * t
        dcap = u * (2.0 - u)
    if HAS_ALIBI:
        qk -= slope * tl.abs(qi + shift - kj).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias + b * s_bb + h * s_bh + qi * s_bm + kj * s_bn, mask=(qi < Lq) & (kj < Lk), other=0.0)
        qk += bias.to(tl.float32)
    # One rounding of s·log2(e) per entry, as the reference rounds s. Scaling a bias shared by many rows before
    # the sum would round it once for all of them: a per-key logit error that a broadcast bias's gradient
    # (a sum over those rows) adds up coherently.
    if ACCURATE:
        return tl.where(vis, qk, float("-inf")), dcap
    else:
        return tl.where(vis, qk * 1.4426950408889634, float("-inf")), dcap


# --------------------------------------------------------------------------------------------- forward
@triton.autotune(configs=_configs("fwd"), key=_KEY + ["SPLIT", "PACK_GQA"],
                 prune_configs_by={"early_config_prune": functools.partial(_prune, "fwd")})
@triton.jit(do_not_specialize=_NOSPEC + ["n_split"])
def _fwd_kernel(Q, K, V, Bias, Mask, KvLens, CuQ, CuK, Out, Lse, OutLo,
                s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                s_bb, s_bh, s_bm, s_bn, s_mb, s_mh, s_mm, s_mn, s_ob, s_oh, s_om, s_lb, s_lh,
                H, GROUP, Lq, Lk, sm_scale, Q_BUCKET, K_BUCKET, Alibi, s_ab, win_left, win_right, softcap,
                dropout_p, keep_scale, seed, drop_Lq, drop_Lk, drop_base, shift0, Visits, n_split, s_os, s_ls,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                BOTTOM_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                COUNT_VISITS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KVLENS: tl.constexpr, SPLIT: tl.constexpr,
                PACK_GQA: tl.constexpr, STORE_LO: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    # grid (query blocks, heads, batch · splits): CUDA caps the last two at 65535 each, not their product
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(2) % n_split
    b = tl.program_id(2) // n_split
    pid_bh = b * tl.num_programs(1) + tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        # One program per kv head: its rows r = i·GROUP + g are query i of head hk·GROUP + g, so the GROUP query
        # heads sharing this K/V read it once (decoding: GROUP times less K/V traffic, GROUP times fuller tiles).
        # h_row / h_col: each row's head as an [M] / [M, 1] tile.
        hk = tl.program_id(1)
        qi = offs_m // GROUP
        h_row = hk * GROUP + offs_m % GROUP
        h_col = h_row[:, None]
        q_first = pid_m * BLOCK_M // GROUP
        q_last = (pid_m * BLOCK_M + BLOCK_M - 1) // GROUP
    else:
        h_row = tl.program_id(1)
        h_col = h_row
        hk = h_row // GROUP
        qi = offs_m
        q_first = pid_m * BLOCK_M
        q_last = q_first + BLOCK_M - 1
    q0, k0, q_len, k_len, kv_len, shift = _extent(CuQ, CuK, KvLens, b, Lq, Lk, shift0, VARLEN, HAS_KVLENS,
                                                  BOTTOM_RIGHT)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    row_ok = qi < q_len
    q = _load_rows(Q + b * s_qb + h_col * s_qh + q0 * s_qm, qi, s_qm, offs_d, q_len, HEAD_DIM)
    K += b * s_kb + hk * s_kh + k0 * s_kn
    V += b * s_vb + hk * s_vh + k0 * s_vn

    # Key blocks outside the window (or past the causal diagonal) of every row of this block are never visited,
    # nor any key block of a query block past the end of its (packed) sequence.
    lo, hi = _key_range(q_first, q_last, kv_len, shift, win_left, win_right, WIN_LEFT, WIN_RIGHT, BLOCK_N)
    if VARLEN:
        hi = tl.where(q_first < q_len, hi, 0)
    if HAS_MASK:
        lo, hi = _mask_trim(lo, hi, qi, b, h_col, Mask, s_mb, s_mh, s_mm, s_mn, q_len, k_len, kv_len, shift,
                            win_left, win_right, WIN_LEFT, WIN_RIGHT, True, BLOCK_N)
    if SPLIT:  # split-KV: this program takes the pid_s-th of n_split runs of whole key blocks of [lo, hi)
        per = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N * n_split) * BLOCK_N
        lo = lo + pid_s * per
        hi = tl.minimum(hi, lo + per)
        Out += pid_s * s_os
        Lse += pid_s * s_ls
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * s_ab + h_col)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # fp32: the rounding errors of acc's sums (_two_sum)
    visits = 0
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        vis = _visible(qi[:, None], offs_n[None, :], b, h_col, Mask, s_mb, s_mh, s_mm, s_mn, q_len, k_len, kv_len,
                       shift, win_left, win_right, WIN_LEFT, WIN_RIGHT, HAS_MASK)
        visits += 1
        k = _load_rows(K, offs_n, s_kn, offs_d, kv_len, HEAD_DIM)
        v = _load_rows(V, offs_n, s_vn, offs_d, kv_len, HEAD_DIM)
        qk, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), vis, qi[:, None], offs_n[None, :],
                        b, h_col, Bias, s_bb, s_bh, s_bm, s_bn, q_len, k_len, sm_scale, shift, slope, softcap,
                        HAS_BIAS, HAS_ALIBI, HAS_SOFTCAP, DOT_PREC == "ieee")
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # While a row has seen nothing, m is −inf; subtracting 0 keeps exp2(−inf − m) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp_scores(qk - m_safe[:, None], DOT_PREC == "ieee")
        alpha = _exp_scores(m_i - m_safe, DOT_PREC == "ieee")
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped weights too
        if DROPOUT:
            keep = _keep(seed, dropout_p, b * H + h_col, qi[:, None], offs_n[None, :], drop_Lq, drop_Lk, drop_base)
            p = tl.where(keep, p, 0.0)
        if DOT_PREC == "ieee":
            acc, acc_lo = _two_sum(acc * alpha[:, None], acc_lo * alpha[:, None],
                                   tl.dot(p, v, input_precision=DOT_PREC))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    norm = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        norm = norm * keep_scale  # 1 − p, rounded once on the host (dropout_keep_scale)
    if DOT_PREC == "ieee":
        # fp32: one correctly rounded division per element, as the reference's p / Σp; lse2 = (m + ln l)·log2(e)
        # in fp64 (m natural), kept whole in the fp64 Lse the op and context parallelism give (an fp32 one would
        # round it, and overflow for a row whose scores are all near −FLT_MAX: a finfo(float32).min bias)
        out = tl.math.div_rn(acc + acc_lo, norm[:, None])
        lse2 = (m_i.to(tl.float64) + tl.math.log(tl.where(empty, 1.0, l_i).to(tl.float64))) * 1.4426950408889634
    else:
        # "/" compiles to div.full.f32 (up to 2 ulp); a correctly rounded reciprocal per row and a product: <= 1 ulp
        out = acc * tl.math.div_rn(1.0, norm)[:, None]
        lse2 = m_i + tl.math.log2(tl.where(empty, 1.0, l_i))
    # A split's empty row gets lse −inf (weight 0 in the combine); a whole row with no visible key, +inf.
    lse2 = tl.where(empty, float("-inf") if SPLIT else float("inf"), lse2)
    tl.store(Lse + b * s_lb + h_row * s_lh + q0 + qi, lse2, mask=row_ok)
    o_offs = b * s_ob + h_col * s_oh + (q0 + qi[:, None]) * s_om + offs_d[None, :]
    _store_out(Out + o_offs, OutLo + o_offs, out, row_ok[:, None] & d_ok, STORE_LO)
    if COUNT_VISITS:  # key blocks computed by this program (tests of the window's block skipping)
        n_bh = tl.num_programs(1) * (tl.num_programs(2) // n_split)
        tl.store(Visits + (pid_s * n_bh + pid_bh) * tl.num_programs(0) + pid_m, visits)


@triton.jit
def _fwd_combine_kernel(OutPart, LsePart, Out, Lse, OutLo, n_split, s_ps, s_ls, s_pb, s_ph, s_pm, s_ob, s_oh, s_om,
                        H, Lq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACCURATE: tl.constexpr,
                        STORE_LO: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merges the n_split partial results (o_s normalised, lse2_s; −inf where a split saw no key) of a row:
    lse2 = log2 Σ_s 2^lse2_s,  o = Σ_s 2^(lse2_s − lse2) o_s  (0 and lse2 = +inf where no split saw a key).
    ACCURATE (fp32): the lse2_s arrive in fp64, unrounded, as the unsplit forward forms them (rounded to fp32, at
    scores of a few hundred their ulp moved each weight by ~1e-6 and the output missed the rule); the weights
    come from their differences, the output from one correctly rounded division per element."""
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    h = tl.program_id(1)
    pid_bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    lse_rows = LsePart + pid_bh * Lq + offs_m
    m = tl.full([BLOCK_M], float("-inf"), LsePart.dtype.element_ty)
    for s in range(n_split):
        m = tl.maximum(m, tl.load(lse_rows + s * s_ls, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(n_split):
        x = tl.load(lse_rows + s * s_ls, mask=row_ok, other=float("-inf")) - m_safe
        w = _exp2(x.to(tl.float32), ACCURATE)
        o = _load_rows(OutPart + s * s_ps + b * s_pb + h * s_ph, offs_m, s_pm, offs_d, Lq, HEAD_DIM)
        l_sum += w
        acc += w[:, None] * o
    empty = l_sum == 0.0
    norm = tl.where(empty, 1.0, l_sum)
    if ACCURATE:
        out = tl.math.div_rn(acc, norm[:, None])
        lse2 = m_safe + tl.math.log(norm.to(tl.float64)) * 1.4426950408889634
    else:
        out = acc * tl.math.div_rn(1.0, norm)[:, None]
        lse2 = m_safe + tl.math.log2(norm)
    lse2 = tl.where(empty, float("inf"), lse2)
    tl.store(Lse + pid_bh * Lq + offs_m, lse2, mask=row_ok)
    o_offs = b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :]
    _store_out(Out + o_offs, OutLo + o_offs, out, row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), STORE_LO)


@triton.jit
def _store_out(Out, OutLo, out, ok, STORE_LO: tl.constexpr):
    """Stores the fp32 output rounded to Out's dtype and, with STORE_LO, what the rounding dropped, rounded to
    OutLo's (the same dtype): o ≈ Out + OutLo to about 2⁻²² relative (bf16: 2⁻¹⁶), for the backward's D_i = do_i·o_i
    (see _bwd_delta_kernel)."""
    hi = out.to(Out.dtype.element_ty)
    tl.store(Out, hi, mask=ok)
    if STORE_LO:
        tl.store(OutLo, (out - hi.to(tl.float32)).to(OutLo.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(Out, OutLo, DO, DLse, Delta, s_ob, s_oh, s_om, s_db, s_dh, s_dm, H, Lq,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_LO: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    h = tl.program_id(1)
    pid_bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * s_ob + h * s_oh, offs_m, s_om, offs_d, Lq, HEAD_DIM)
    do = _load_rows(DO + b * s_db + h * s_dh, offs_m, s_dm, offs_d, Lq, HEAD_DIM)
    # D_i = do_i·o_i through the same tl.dot reduction that forms dp_ij = do_i·v_j in the other kernels: a row
    # with one visible key has o_i = v_j bitwise, and then dp − D cancels exactly (its gradient is exactly 0).
    dd = tl.dot(do, tl.trans(o.to(do.dtype)), input_precision=DOT_PREC)
    delta = tl.sum(tl.where(offs_m[:, None] == offs_m[None, :], dd, 0.0), 1)
    if HAS_LO:
        # fp16/bf16: plus do_i·lo_i, the part of o_i that rounding the output dropped (_store_out). Taken from the
        # rounded o alone, D errs by up to ~2⁻¹¹·|do_i|·|o_i|, and ds_ij = p_ij (dp_ij − D_i) passes that on whole
        # where one p_ij dominates a row (an attention sink), where the reference's softmax backward shrinks its
        # own rounding by 1 − p_ij: dk missed the §5 rule by ×5 at p ≈ 0.99 (README, Numerics). A row with one
        # visible key and no dropout has lo = 0 and still cancels exactly.
        lo = _load_rows(OutLo + b * s_ob + h * s_oh, offs_m, s_om, offs_d, Lq, HEAD_DIM)
        delta += tl.sum(do.to(tl.float32) * lo.to(tl.float32), 1)
    if HAS_DLSE:  # d lse2_i / d s_ij = log2(e) p_ij: folds into ds_ij = p_ij (dp_ij − D_i) through D_i
        dlse2 = tl.load(DLse + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        delta -= dlse2 * 1.4426950408889634
    tl.store(Delta + pid_bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.autotune(configs=_configs("dkdv"), key=_KEY,
                 prune_configs_by={"early_config_prune": functools.partial(_prune, "dkdv")})
@triton.jit(do_not_specialize=_NOSPEC)
def _bwd_dkdv_kernel(Q, K, V, Bias, Mask, KvLens, CuQ, CuK, DO, Lse, Delta, Scale, DK, DV, DBias,
                     s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                     s_bb, s_bh, s_bm, s_bn, s_mb, s_mh, s_mm, s_mn, s_db, s_dh, s_dm, s_lb, s_lh,
                     s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                     H, GROUP, Lq, Lk, sm_scale, Q_BUCKET, K_BUCKET, Alibi, s_ab, win_left, win_right, softcap,
                     dropout_p, keep_scale, seed, drop_Lq, drop_Lk, drop_base, shift0, Visits,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                     BOTTOM_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     COUNT_VISITS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_KVLENS: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    HKV = H // GROUP
    b = tl.program_id(2)
    hk = tl.program_id(1)
    pid_bhk = b * HKV + hk
    q0, k0, q_len, k_len, kv_len, shift = _extent(CuQ, CuK, KvLens, b, Lq, Lk, shift0, VARLEN, HAS_KVLENS,
                                                  BOTTOM_RIGHT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    k = _load_rows(K + b * s_kb + hk * s_kh + k0 * s_kn, offs_n, s_kn, offs_d, kv_len, HEAD_DIM)
    v = _load_rows(V + b * s_vb + hk * s_vh + k0 * s_vn, offs_n, s_vn, offs_d, kv_len, HEAD_DIM)
    Q += b * s_qb + q0 * s_qm
    DO += b * s_db + q0 * s_dm

    # Query rows whose window (or causal diagonal) misses this key block are never visited.
    lo, hi = _query_range(pid_n * BLOCK_N, q_len, shift, win_left, win_right, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)
    if pid_n * BLOCK_N >= kv_len:  # a block of padding keys: gradients are 0, skip the query loop
        hi = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk_lo = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # fp32: the rounding errors of dk's and dv's sums (_two_sum)
    dv_lo = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    visits = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b * s_ab + h)
        q_lo = lo
        q_hi = hi
        if HAS_MASK:
            q_lo, q_hi = _mask_trim(lo, hi, offs_n, b, h, Mask, s_mb, s_mh, s_mm, s_mn, q_len, k_len, kv_len, shift,
                                    win_left, win_right, WIN_LEFT, WIN_RIGHT, False, BLOCK_M)
        for start_m in range(q_lo, q_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            # Transposed tiles [BLOCK_N, BLOCK_M] (key j, query i): sᵀ = k·qᵀ and dpᵀ = v·doᵀ come out of the dots
            # in the layout the dk/dv dots take, so no dot result is ever transposed.
            qi = offs_m[None, :]
            kj = offs_n[:, None]
            visT = _visible(qi, kj, b, h, Mask, s_mb, s_mh, s_mm, s_mn, q_len, k_len, kv_len, shift, win_left,
                            win_right, WIN_LEFT, WIN_RIGHT, HAS_MASK)
            visits += 1
            q = _load_rows(Q + h * s_qh, offs_m, s_qm, offs_d, q_len, HEAD_DIM)
            do = _load_rows(DO + h * s_dh, offs_m, s_dm, offs_d, q_len, HEAD_DIM)
            lse, delta, delta_lo, c = _row_stats(Lse, Delta, Scale, b * s_lb + h * s_lh + q0 + offs_m,
                                                 offs_m < q_len, DOT_PREC == "ieee", True)
            sT, dcapT = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), visT, qi, kj, b, h, Bias,
                                s_bb, s_bh, s_bm, s_bn, q_len, k_len, sm_scale, shift, slope, softcap, HAS_BIAS,
                                HAS_ALIBI, HAS_SOFTCAP, DOT_PREC == "ieee")
            pT = _exp_scores(sT - lse[None, :], DOT_PREC == "ieee")  # 0 where invisible or the row is empty
            if DOT_PREC == "ieee":
                pT = pT * c[None, :]
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            pT_out = pT
            if DROPOUT:  # out used p·keep/(1 − p_drop): so does dv, and dp (_kept_dp)
                keep = _keep(seed, dropout_p, bh, qi, kj, drop_Lq, drop_Lk, drop_base)
                pT_out = tl.where(keep, _div(pT, keep_scale, DOT_PREC == "ieee"), 0.0)
                dpT = _kept_dp(dpT, keep, keep_scale, DOT_PREC == "ieee")
            dsT = _ds(pT, dpT, delta[None, :], delta_lo[None, :], DOT_PREC == "ieee", DROPOUT)
            if BIAS_GRAD:
                tl.store(DBias + bh * Lq * Lk + qi * Lk + kj, dsT, mask=(qi < Lq) & (kj < Lk))
            if DOT_PREC == "ieee":
                dv, dv_lo = _two_sum(dv, dv_lo, tl.dot(pT_out, do, input_precision=DOT_PREC))
                dk, dk_lo = _two_sum(dk, dk_lo, tl.dot(dsT * dcapT, q, input_precision=DOT_PREC))
            else:
                dv += tl.dot(pT_out.to(do.dtype), do, input_precision=DOT_PREC)
                dk += tl.dot((dsT * dcapT).to(q.dtype), q, input_precision=DOT_PREC)
    if DOT_PREC == "ieee":
        dk += dk_lo
        dv += dv_lo

    # Every key row of the sequence is written (0 for padding keys); in a packed batch, none of the next one's.
    st_ok = (offs_n[:, None] < k_len) & d_ok
    tl.store(DK + b * s_dkb + hk * s_dkh + (k0 + offs_n[:, None]) * s_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + b * s_dvb + hk * s_dvh + (k0 + offs_n[:, None]) * s_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=st_ok)
    if COUNT_VISITS:
        tl.store(Visits + pid_bhk * tl.num_programs(0) + pid_n, visits)


@triton.autotune(configs=_configs("dq"), key=_KEY,
                 prune_configs_by={"early_config_prune": functools.partial(_prune, "dq")})
@triton.jit(do_not_specialize=_NOSPEC)
def _bwd_dq_kernel(Q, K, V, Bias, Mask, KvLens, CuQ, CuK, DO, Lse, Delta, Scale, DQ,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                   s_bb, s_bh, s_bm, s_bn, s_mb, s_mh, s_mm, s_mn, s_db, s_dh, s_dm, s_lb, s_lh,
                   s_dqb, s_dqh, s_dqm,
                   H, GROUP, Lq, Lk, sm_scale, Q_BUCKET, K_BUCKET, Alibi, s_ab, win_left, win_right, softcap,
                   dropout_p, keep_scale, seed, drop_Lq, drop_Lk, drop_base, shift0, Visits,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                   BOTTOM_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   COUNT_VISITS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_KVLENS: tl.constexpr, DOT_PREC: tl.constexpr, DELTA_PASS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq_i = scale Σ_j ds_ij k_j. With DELTA_PASS (fp32, launched first) it instead adds Σ_j p_ij dp_ij / Σ_j p_ij
    (in fp64) to D_i, the D that the dq, dK/dV and dbias launches then read. This D, from the p and dp the backward
    uses, rather than do_i·o_i (o carries the forward's own error), normalised by Σ_j p_ij (lse2's rounding moves it
    off 1 for every j alike; the sum starts from Scale's value, a sink's weight), makes Σ_j p_ij (dp_ij − D_i) = 0
    hold for these p, as it does in the reference's softmax backward (normalised p); with do_i·o_i, fp32 dk and
    dbias missed the §5 rule (README, Numerics)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    h = tl.program_id(1)
    pid_bh = b * H + h
    hk = h // GROUP
    q0, k0, q_len, k_len, kv_len, shift = _extent(CuQ, CuK, KvLens, b, Lq, Lk, shift0, VARLEN, HAS_KVLENS,
                                                  BOTTOM_RIGHT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    row_ok = offs_m < q_len
    q_ok = row_ok[:, None] & d_ok
    q = _load_rows(Q + b * s_qb + h * s_qh + q0 * s_qm, offs_m, s_qm, offs_d, q_len, HEAD_DIM)
    do = _load_rows(DO + b * s_db + h * s_dh + q0 * s_dm, offs_m, s_dm, offs_d, q_len, HEAD_DIM)
    lse, delta, delta_lo, c = _row_stats(Lse, Delta, Scale, b * s_lb + h * s_lh + q0 + offs_m, row_ok,
                                         DOT_PREC == "ieee", not DELTA_PASS)
    K += b * s_kb + hk * s_kh + k0 * s_kn
    V += b * s_vb + hk * s_vh + k0 * s_vn

    lo, hi = _key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, kv_len, shift, win_left, win_right,
                        WIN_LEFT, WIN_RIGHT, BLOCK_N)
    if VARLEN:
        hi = tl.where(pid_m * BLOCK_M < q_len, hi, 0)
    if HAS_MASK:
        lo, hi = _mask_trim(lo, hi, offs_m, b, h, Mask, s_mb, s_mh, s_mm, s_mn, q_len, k_len, kv_len, shift,
                            win_left, win_right, WIN_LEFT, WIN_RIGHT, True, BLOCK_N)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * s_ab + h)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq_lo = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # fp32: the rounding errors of dq's sums (_two_sum)
    visits = 0
    p_sum = tl.zeros([BLOCK_M], tl.float64)
    if DELTA_PASS:  # from the weight of the caller's sink logit, which the row's softmax also holds (0 without)
        p_sum += tl.load(Scale + b * s_lb + h * s_lh + q0 + offs_m, mask=row_ok, other=0.0).to(tl.float64)
    pdp_sum = tl.zeros([BLOCK_M], tl.float64)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        vis = _visible(offs_m[:, None], offs_n[None, :], b, h, Mask, s_mb, s_mh, s_mm, s_mn, q_len, k_len, kv_len,
                       shift, win_left, win_right, WIN_LEFT, WIN_RIGHT, HAS_MASK)
        k = _load_rows(K, offs_n, s_kn, offs_d, kv_len, HEAD_DIM)
        v = _load_rows(V, offs_n, s_vn, offs_d, kv_len, HEAD_DIM)
        qk, dcap = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), vis, offs_m[:, None],
                           offs_n[None, :], b, h, Bias, s_bb, s_bh, s_bm, s_bn, q_len, k_len, sm_scale, shift,
                           slope, softcap, HAS_BIAS, HAS_ALIBI, HAS_SOFTCAP, DOT_PREC == "ieee")
        p = _exp_scores(qk - lse[:, None], DOT_PREC == "ieee")
        if (DOT_PREC == "ieee") & (not DELTA_PASS):
            p = p * c[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DROPOUT:
            keep = _keep(seed, dropout_p, pid_bh, offs_m[:, None], offs_n[None, :], drop_Lq, drop_Lk, drop_base)
            dp = _kept_dp(dp, keep, keep_scale, DOT_PREC == "ieee")
        if DELTA_PASS:
            p64 = p.to(tl.float64)
            p_sum += tl.sum(p64, 1)
            pdp_sum += tl.sum(p64 * dp.to(tl.float64), 1)
        else:
            visits += 1
            ds = _ds(p, dp, delta[:, None], delta_lo[:, None], DOT_PREC == "ieee", DROPOUT) * dcap
            if DOT_PREC == "ieee":
                dq, dq_lo = _two_sum(dq, dq_lo, tl.dot(ds, k, input_precision=DOT_PREC))
            else:
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    if DELTA_PASS:  # the fp64 Delta held −log2(e)·dlse2 (backward); a row with no visible key adds 0
        p_sum = tl.where(p_sum == 0.0, 1.0, p_sum)
        rows = Delta + b * s_lb + h * s_lh + q0 + offs_m
        tl.store(rows, tl.load(rows, mask=row_ok, other=0.0) + pdp_sum / p_sum, mask=row_ok)
        tl.store(Scale + b * s_lb + h * s_lh + q0 + offs_m, (1.0 / p_sum).to(tl.float32), mask=row_ok)
    else:
        if DOT_PREC == "ieee":
            dq += dq_lo
        tl.store(DQ + b * s_dqb + h * s_dqh + (q0 + offs_m[:, None]) * s_dqm + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)
        if COUNT_VISITS:
            tl.store(Visits + pid_bh * tl.num_programs(0) + pid_m, visits)


# The same kernel with DELTA_PASS, tuned over its own tiles; restore_value: a run adds to Delta, and autotuning
# runs it once per config.
_bwd_delta_pass_kernel = triton.autotune(
    configs=_configs("delta"), key=_KEY, restore_value=["Delta", "Scale"],
    prune_configs_by={"early_config_prune": functools.partial(_prune, "delta")})(_bwd_dq_kernel.fn)


@triton.jit(do_not_specialize=_NOSPEC)
def _bwd_dbias_kernel(Q, K, V, Bias, Mask, KvLens, CuQ, CuK, DO, Lse, Delta, Scale, DBias,
                      s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                      s_bb, s_bh, s_bm, s_bn, s_mb, s_mh, s_mm, s_mn, s_db, s_dh, s_dm, s_lb, s_lh,
                      s_gb, s_gh, s_gm, s_gn, n_batch, slot0,
                      H, GROUP, Lq, Lk, sm_scale, Q_BUCKET, K_BUCKET, Alibi, s_ab, win_left, win_right, softcap,
                      dropout_p, keep_scale, seed, drop_Lq, drop_Lk, drop_base, shift0, Visits,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                      BOTTOM_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      COUNT_VISITS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KVLENS: tl.constexpr, DOT_PREC: tl.constexpr,
                      ALL_B: tl.constexpr, ALL_H: tl.constexpr, ALL_M: tl.constexpr, ALL_N: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dbias of a bias broadcast over some of (batch, head, query, key): Σ ds_ij over the broadcast dims (ALL_*),
    one program per tile of dbias looping over them in a fixed order, so no [B, H, Lq, Lk] buffer and no atomics.
    Recomputes p and dp as the dK/dV kernel does; a tile's sum runs elementwise over the visited tiles and is
    reduced over the broadcast axes at the end."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # (b, h) of this dbias tile: b·H + h, with a broadcast dim counted as size 1 (a launch takes 65535 from slot0)
    slot = slot0 + tl.program_id(2)
    if ALL_H:
        b_slot = slot
        h_slot = 0
        h_lo = 0
        h_hi = H
    else:
        b_slot = slot // H
        h_slot = slot % H
        h_lo = h_slot
        h_hi = h_slot + 1
    b_lo = b_slot
    b_hi = b_slot + 1
    if ALL_B:
        b_lo = 0
        b_hi = n_batch
    m_lo = pid_m * BLOCK_M
    m_hi = m_lo + 1
    if ALL_M:
        m_hi = Lq
    n_lo = pid_n * BLOCK_N
    n_hi = n_lo + 1
    if ALL_N:
        n_hi = Lk
    offs_d = tl.arange(0, BLOCK_D)
    # fp32 inputs sum in fp64: a dbias entry adds up to B·H·Lq terms, and sequential fp32 sums of that many lose
    # several times what torch's cascade sum of the fp32 reference does (one add per term: cheap beside the dots).
    if Q.dtype.element_ty == tl.float32:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(b_lo, b_hi):
        q0, k0, q_len, k_len, kv_len, shift = _extent(CuQ, CuK, KvLens, b, Lq, Lk, shift0, VARLEN, HAS_KVLENS,
                                                      BOTTOM_RIGHT)
        for h in range(h_lo, h_hi):
            hk = h // GROUP
            slope = 0.0
            if HAS_ALIBI:
                slope = tl.load(Alibi + b * s_ab + h)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q = _load_rows(Q + b * s_qb + h * s_qh + q0 * s_qm, offs_m, s_qm, offs_d, q_len, HEAD_DIM)
                do = _load_rows(DO + b * s_db + h * s_dh + q0 * s_dm, offs_m, s_dm, offs_d, q_len, HEAD_DIM)
                lse, delta, delta_lo, c = _row_stats(Lse, Delta, Scale, b * s_lb + h * s_lh + q0 + offs_m,
                                                     offs_m < q_len, DOT_PREC == "ieee", True)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    vis = _visible(offs_m[:, None], offs_n[None, :], b, h, Mask, s_mb, s_mh, s_mm, s_mn, q_len,
                                   k_len, kv_len, shift, win_left, win_right, WIN_LEFT, WIN_RIGHT, HAS_MASK)
                    if tl.max(vis.to(tl.int32)) > 0:  # tiles outside the window / masked away add nothing
                        k = _load_rows(K + b * s_kb + hk * s_kh + k0 * s_kn, offs_n, s_kn, offs_d, kv_len, HEAD_DIM)
                        v = _load_rows(V + b * s_vb + hk * s_vh + k0 * s_vn, offs_n, s_vn, offs_d, kv_len, HEAD_DIM)
                        qk, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), vis, offs_m[:, None],
                                        offs_n[None, :], b, h, Bias, s_bb, s_bh, s_bm, s_bn, q_len, k_len, sm_scale,
                                        shift, slope, softcap, HAS_BIAS, HAS_ALIBI, HAS_SOFTCAP, DOT_PREC == "ieee")
                        p = _exp_scores(qk - lse[:, None], DOT_PREC == "ieee")
                        if DOT_PREC == "ieee":
                            p = p * c[:, None]
                        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                        if DROPOUT:
                            keep = _keep(seed, dropout_p, b * H + h, offs_m[:, None], offs_n[None, :], drop_Lq,
                                         drop_Lk, drop_base)
                            dp = _kept_dp(dp, keep, keep_scale, DOT_PREC == "ieee")
                        acc += _ds(p, dp, delta[:, None], delta_lo[:, None], DOT_PREC == "ieee", DROPOUT)

    out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (out_m[:, None] < Lq) & (out_n[None, :] < Lk)
    if ALL_M:
        acc = tl.sum(acc, 0, keep_dims=True)
        out_m = tl.arange(0, 1)
        ok = out_n[None, :] < Lk
    if ALL_N:
        acc = tl.sum(acc, 1, keep_dims=True)
        out_n = tl.arange(0, 1)
        ok = out_m[:, None] < Lq
        if ALL_M:
            ok = out_m[:, None] < 1
    tl.store(DBias + b_slot * s_gb + h_slot * s_gh + out_m[:, None] * s_gm + out_n[None, :] * s_gn,
             acc.to(tl.float32), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(Keep, seed, dropout_p, Lq, Lk, bh0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels use, written out as uint8 [B, H, Lq, Lk] (debugging and tests), for
    the (b, h) slices from bh0 on (a launch takes at most 65535)."""
    pid_bh = bh0 + tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, dropout_p, pid_bh, offs_m[:, None], offs_n[None, :], Lq, Lk, 0)
    tl.store(Keep + (pid_bh.to(tl.int64) * Lq + offs_m[:, None]) * Lk + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# --------------------------------------------------------------------------------------------- launchers
def _bcast_strides(t):
    """Strides of a canonical 4-d mask/bias with 0 on broadcast (size-1) dims; zeros when absent."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _rows(t, varlen):
    """(batch, head, row) strides of a [B, H, L, D] tensor, or of a packed [total, H, D] one (batch stride 0:
    the kernels find a sequence's rows from cu_seqlens)."""
    return (0, t.stride(1), t.stride(0)) if varlen is not None else tuple(t.stride()[:3])


def _common(q, k, bias, mask, kv_lens, scale, causal, bottom_right, window, alibi, softcap, count, dropout, varlen,
            origin=None):
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]  # [B, H, L, D] or packed [total, H, D]
    if varlen is not None:  # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        B, Lq, Lk = varlen[0].shape[0] - 1, varlen[2], varlen[3]
    else:
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        raise ValueError(f"batch {B} and heads {H}: the Triton attention kernels take at most {MAX_GRID_YZ} of each "
                         "(their grid's second and third axes, CUDA's limit); split the batch")
    left, right = window
    if causal:
        right = 0
    dropout_p, seed = dropout
    # origin (i0, j0, Lq', Lk'): these rows and keys start at i0 and j0 of a [Lq', Lk'] problem (one block of
    # context parallelism): windows, causal and ALiBi take global positions, and the dropout mask is that problem's
    i0, j0, drop_Lq, drop_Lk = origin if origin is not None else (0, 0, Lq, Lk)
    shift0, drop_base = i0 - j0, i0 * drop_Lk + j0
    dummy = q  # pointer for absent optional tensors; never dereferenced
    args = dict(H=H, GROUP=H // Hkv, Lq=Lq, Lk=Lk, sm_scale=scale,
                Q_BUCKET=triton.next_power_of_2(Lq), K_BUCKET=triton.next_power_of_2(Lk),
                Alibi=alibi if alibi is not None else dummy,
                s_ab=alibi.stride(0) if alibi is not None and alibi.shape[0] > 1 else 0,
                win_left=max(left, 0), win_right=max(right, 0), softcap=float(softcap),
                dropout_p=_fp32(dropout_p), keep_scale=dropout_keep_scale(dropout_p), seed=int(seed),
                drop_Lq=drop_Lq, drop_Lk=drop_Lk, drop_base=drop_base, shift0=shift0,
                HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), WIN_LEFT=left >= 0, WIN_RIGHT=right >= 0,
                BOTTOM_RIGHT=bottom_right, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                HAS_KVLENS=kv_lens is not None, HAS_ALIBI=alibi is not None, HAS_SOFTCAP=softcap > 0.0,
                COUNT_VISITS=count is not None, VARLEN=varlen is not None, DROPOUT=dropout_p > 0.0,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                # fp32: no contraction of a product and a sum into an FMA, as the interpreter (see FP32_OPTIONS)
                **(FP32_OPTIONS if q.dtype == torch.float32 else {}))
    ptrs = (bias if bias is not None else dummy,
            mask.view(torch.uint8) if mask is not None else dummy,
            kv_lens if kv_lens is not None else dummy,
            varlen[0] if varlen is not None else dummy, varlen[1] if varlen is not None else dummy)
    # lse / delta: [B, H, Lq] contiguous, or [H, total_q] for a packed batch
    lse_strides = (0, q.shape[0]) if varlen is not None else (H * Lq, Lq)
    return B, H, Hkv, Lq, Lk, args, ptrs, _bcast_strides(bias) + _bcast_strides(mask), lse_strides


def _check_lo(out, out_lo):
    """The kernels index out_lo with out's strides; fp32 outputs have none (their D comes from the D pass)."""
    if out_lo is not None and (out_lo.dtype != out.dtype or out_lo.shape != out.shape
                               or out_lo.stride() != out.stride() or out.dtype == torch.float32):
        raise ValueError(f"out_lo must be like out ({out.dtype}, {tuple(out.shape)}, strides {out.stride()}; "
                         f"fp16/bf16), got {out_lo.dtype}, {tuple(out_lo.shape)}, strides {out_lo.stride()}")


def _visits(count, key, programs, like):
    """Zeroed int32 counters, one per program (at most ``programs``), stored in ``count[key]``; else a dummy."""
    if count is None:
        return like
    count[key] = torch.zeros(programs, dtype=torch.int32, device=like.device)
    return count[key]


MIN_BLOCK = 16  # smallest BLOCK_M / BLOCK_N of any config: bounds the number of programs per axis
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z extents, where the kernels put heads and batch


def forward(q, k, v, bias, mask, kv_lens, out, lse, scale, causal, bottom_right, window=(-1, -1), alibi=None,
            softcap=0.0, count=None, dropout=(0.0, 0), varlen=None, out_lo=None, origin=None):
    """Fill ``out`` like q and ``lse`` (fp32, or fp64 as the op gives for fp32 inputs; contiguous, base 2:
    lse·log2(e)): q [B, H, Lq, D] and lse [B, H, Lq],
    or with ``varlen`` = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) packed q [total_q, H, D],
    k/v [total_k, Hkv, D] and lse [H, total_q]. Last dims must be contiguous. ``window`` = (left, right), −1
    unbounded; ``alibi``: fp32 [1|B, H]; ``softcap`` > 0 caps scores; ``dropout`` = (p, Philox seed).
    ``count``: a dict that receives the key blocks each program computed ("fwd"). ``out_lo`` (fp16/bf16, like
    ``out`` with its strides) receives what rounding the output dropped, for :func:`backward`. ``origin`` =
    (i0, j0, Lq', Lk'): q's rows and k's keys are positions i0.. and j0.. of a [Lq', Lk'] problem (context
    parallelism's blocks): the window, top-left causal diagonal, ALiBi and dropout mask are that problem's. (The
    counter base i0·Lk' + j0 is typed int32 by Triton until it passes 2^31: blocks past it compile once more.)"""
    _check_lo(out, out_lo)
    B, H, Hkv, Lq, Lk, args, ptrs, bm_strides, lse_strides = _common(
        q, k, bias, mask, kv_lens, scale, causal, bottom_right, window, alibi, softcap, count, dropout, varlen, origin)
    group = H // Hkv
    pack = _pack_for(q, group, Lq, args["BLOCK_D"])
    heads, rows = (Hkv, Lq * group) if pack else (H, Lq)  # a packed program's rows: its kv head's query heads
    n_split = min(_splits_for(q, B * heads, rows, Lk, args["BLOCK_D"]), MAX_GRID_YZ // B)  # grid axis 2: B·splits
    visits = _visits(count, "fwd", n_split * B * heads * triton.cdiv(rows, MIN_BLOCK), lse)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), heads, B * n_split)  # noqa: E731
    # Split-KV: each split writes its normalised fp32 partial output and lse2 (fp64 for fp32 inputs: see the
    # combine kernel) to a workspace; a second kernel merges.
    o_dst, lse_dst = out, lse
    if n_split > 1:
        o_dst = empty((n_split, *out.shape), like=out, dtype=torch.float32)
        lse_dst = empty((n_split, *lse.shape), like=lse,
                        dtype=torch.float64 if args["DOT_PREC"] == "ieee" else torch.float32)
    o_rows = _rows(o_dst[0] if n_split > 1 else out, varlen)
    with device_ctx(q):
        lo = out_lo if out_lo is not None else out
        _launch(_fwd_kernel, grid, q, k, v, *ptrs, o_dst, lse_dst, lo,
                *_rows(q, varlen), *_rows(k, varlen), *_rows(v, varlen), *bm_strides, *o_rows, *lse_strides,
                Visits=visits, n_split=n_split, s_os=o_dst.stride(0), s_ls=lse_dst.stride(0), SPLIT=n_split > 1,
                PACK_GQA=pack, STORE_LO=out_lo is not None and n_split == 1, **args)
        if n_split > 1:
            # Like the delta kernel, the merge sees a packed batch as one sequence of total_q rows.
            rows_total = q.shape[0] if varlen is not None else Lq
            _fwd_combine_kernel[(triton.cdiv(rows_total, COMBINE_BLOCK), H, 1 if varlen is not None else B)](
                o_dst, lse_dst, out, lse, lo, n_split, o_dst.stride(0), lse_dst.stride(0), *o_rows,
                *_rows(out, varlen), H, rows_total, HEAD_DIM=args["HEAD_DIM"], BLOCK_D=args["BLOCK_D"],
                ACCURATE=args["DOT_PREC"] == "ieee", STORE_LO=out_lo is not None, BLOCK_M=COMBINE_BLOCK,
                **_options(args))


# ------------------------------------------------------------------------------- split-KV and packed GQA
# When the (batch · head · query-block) programs cannot fill the GPU (decoding: Lq = 1; short queries against a
# long cache), the forward also splits each program's keys into runs of whole key blocks, one program each, and
# merges their partial results by their log-sum-exps (FlashDecoding). When a query block would be mostly empty
# rows (few queries per head: decoding), one program takes the queries of all the query heads that share a kv
# head (packed GQA, as FlashAttention-3 does). The backward is unchanged by either.
COMBINE_BLOCK = 16
_FORCED_LAYOUT = {"splits": [], "pack_gqa": []}  # values of the active forced_splits / forced_pack_gqa


@contextlib.contextmanager
def _forcing(name, value):
    _FORCED_LAYOUT[name].append(value)
    try:
        yield
    finally:
        _FORCED_LAYOUT[name].pop()


def forced_splits(n: int):
    """Run the forward (of either kernel backend) with ``n`` key splits (1: never split) instead of the heuristic,
    e.g. to test splitting on the CPU, where the heuristic never splits."""
    return _forcing("splits", int(n))


def forced_layout(name: str):
    """The value of the innermost active :func:`forced_splits` (``name`` "splits") or :func:`forced_pack_gqa`
    ("pack_gqa"), else None."""
    return _FORCED_LAYOUT[name][-1] if _FORCED_LAYOUT[name] else None


def forced_pack_gqa(pack: bool):
    """Run the forward with (True) or without (False) packed GQA instead of the heuristic, on either backend (a
    group of 1 never packs, nor, on the CUDA backend, a call whose rows differ by more than head and position: see
    fastattn.cuda.attention.pack_gqa)."""
    return _forcing("pack_gqa", bool(pack))


def pack_gqa(group: int, Lq: int, block_m: int) -> bool:
    """Pack the ``group`` query heads of a kv head into one program's rows when that fills query blocks of
    ``block_m`` rows better: when Lq rows per head use under 90% of the fraction of their tiles that Lq · group
    rows would (FlashAttention-3's rule). Decoding (Lq = 1) packs; long queries don't."""
    def used(rows):
        return rows / (-(-rows // block_m) * block_m)
    return group > 1 and used(Lq) < 0.9 * used(Lq * group)


def _pack_for(q, group, Lq, block_d):
    """Forced packing (for a group > 1), else the rule for the default tile's query block."""
    if group == 1:
        return False
    if _FORCED_LAYOUT["pack_gqa"]:
        return _FORCED_LAYOUT["pack_gqa"][-1]
    block_m = INTERPRET_BLOCK if INTERPRET else tiles_for("fwd", q.element_size(), block_d)[0][0]
    return pack_gqa(group, Lq, block_m)


def num_splits(programs: int, key_blocks: int, sms: int, max_splits: int = 64) -> int:
    """Key splits for a forward of ``programs`` (query block, batch · head) programs of ``key_blocks`` key blocks
    each on ``sms`` multiprocessors: 1 while the programs fill 80% of the GPU; else the fewest splits whose waves of
    programs · splits are at least 85% as full as the best choice, with at least two key blocks per split."""
    limit = min(max_splits, key_blocks // 2)
    if programs >= 0.8 * sms or limit < 2:
        return 1

    def fill(n):  # average occupancy of the waves of programs · n blocks
        waves = programs * n / sms
        return waves / -(-waves // 1)
    best = max(fill(n) for n in range(1, limit + 1))
    return next(n for n in range(1, limit + 1) if fill(n) >= 0.85 * best)


@functools.lru_cache(maxsize=None)
def multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits_for(q, heads, rows, Lk, block_d):
    """Forced splits, else the heuristic on GPUs (with the default tile's blocks), else 1, for a forward of
    ``heads`` (batch · head) slices of ``rows`` query rows each."""
    if forced_layout("splits") is not None:
        return forced_layout("splits")
    if not q.is_cuda:
        return 1
    block_m, block_n = tiles_for("fwd", q.element_size(), block_d)[0][:2]
    return num_splits(heads * triton.cdiv(rows, block_m), triton.cdiv(Lk, block_n), multiprocessors(q.device.index))


def backward(do, q, k, v, out, lse, dlse, bias, mask, kv_lens, dq, dk, dv, dbias, scale, causal, bottom_right,
             window=(-1, -1), alibi=None, softcap=0.0, count=None, dropout=(0.0, 0), varlen=None, delta_from_p=True,
             row_scale=None, out_lo=None, sink_weight=None, origin=None):
    """Fill dq, dk, dv (like q, k, v) and, when ``dbias`` is given, dbias (fp32, contiguous, shaped like the
    canonical bias, zero-initialised by the caller) with ds summed over the bias's broadcast dims. Layouts and
    options as :func:`forward`, with the same ``dropout`` seed; with dropout, fp32 ``v`` holds r·v
    (fastattn.ops.attention._dp_values: V enters the backward through dp only). ``count`` receives "dkdv"
    (query blocks per key-block program) and "dq" (key blocks per query-block program). fp16/bf16 take
    D_i = do_i·(out_i + out_lo_i) with the forward's ``out_lo`` (do_i·out_i without it). For fp32,
    D comes from the recomputed p and dp rather than from ``out`` (see _bwd_dq_kernel) unless ``delta_from_p`` is
    False, as a caller whose keys are only part of those ``out`` and ``lse`` saw (context parallelism) passes;
    such a caller may give fp32 ``row_scale`` (like lse) = exp(lse2·ln 2 − lse) for its exact natural LSE
    (e.g. fp64), which the fp32 weights then take as c_i (see _row_stats), as the D pass gives them otherwise.
    fp32 ``sink_weight`` (like lse): e^(σ − r_i) of each row's logit σ that has no value (a sink, already in lse),
    r_i = lse2_i·ln 2 rounded to fp32 as _row_stats forms it; the D pass counts it in Σ_j p_ij. ``origin``: as
    :func:`forward`'s."""
    _check_lo(out, out_lo)
    B, H, Hkv, Lq, Lk, args, ptrs, bm_strides, lse_strides = _common(
        q, k, bias, mask, kv_lens, scale, causal, bottom_right, window, alibi, softcap, count, dropout, varlen, origin)
    # A full-size bias gets ds stored by the dK/dV kernel; a broadcast one its own reduction kernel.
    bcast = dbias is not None and tuple(dbias.shape) != (B, H, Lq, Lk)
    # fp32: a first launch of the dq kernel (DELTA_PASS) adds Σ_j p_ij dp_ij / Σ_j p_ij to −log2(e)·dlse2_i;
    # fp16/bf16 take D_i = do_i·o_i − log2(e)·dlse2_i from the delta kernel.
    fp32 = args["DOT_PREC"] == "ieee"
    recompute = fp32 and delta_from_p
    # filled by the delta kernel, or the start the D pass adds to; fp64 for fp32 inputs (see _row_stats)
    delta = torch.empty_like(lse, dtype=torch.float64 if fp32 else torch.float32)
    # fp32: each row's weight scale c_i (_row_stats), written by the D pass (its Σ_j p_ij starts from the value
    # found there); 1 where D comes from out
    if recompute:
        row_scale = (torch.zeros_like(lse, dtype=torch.float32) if sink_weight is None
                     else sink_weight.to(torch.float32, copy=True))
    elif not fp32:
        row_scale = delta  # not read
    elif row_scale is None:
        row_scale = torch.ones_like(lse, dtype=torch.float32)
    if recompute and dlse is None:
        delta.zero_()
    elif recompute:
        torch.mul(dlse.double(), -LOG2E, out=delta)
    # The delta kernel sees a packed batch as one sequence of total_q rows: [H, total_q] is its [1, H, Lq].
    rows_total = q.shape[0] if varlen is not None else Lq
    with device_ctx(q):
        if not recompute:
            _bwd_delta_kernel[(triton.cdiv(rows_total, DELTA_BLOCK), H, 1 if varlen is not None else B)](
                out, out_lo if out_lo is not None else out, do, dlse if dlse is not None else delta, delta,
                *_rows(out, varlen), *_rows(do, varlen), H, rows_total, HEAD_DIM=args["HEAD_DIM"],
                BLOCK_D=args["BLOCK_D"], HAS_DLSE=dlse is not None, HAS_LO=out_lo is not None,
                DOT_PREC=args["DOT_PREC"], BLOCK_M=DELTA_BLOCK, **_options(args))
        common = (*_rows(q, varlen), *_rows(k, varlen), *_rows(v, varlen), *bm_strides, *_rows(do, varlen),
                  *lse_strides)
        for kernel in (_bwd_delta_pass_kernel, _bwd_dq_kernel) if recompute else (_bwd_dq_kernel,):
            _launch(kernel, lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), H, B),
                    q, k, v, *ptrs, do, lse, delta, row_scale, dq, *common, *_rows(dq, varlen),
                    Visits=_visits(count, "dq", B * H * triton.cdiv(Lq, MIN_BLOCK), delta),
                    DELTA_PASS=kernel is _bwd_delta_pass_kernel, **args)
        _launch(_bwd_dkdv_kernel, lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), Hkv, B),
                q, k, v, *ptrs, do, lse, delta, row_scale, dk, dv, dbias if dbias is not None else delta,
                *common, *_rows(dk, varlen), *_rows(dv, varlen), BIAS_GRAD=dbias is not None and not bcast,
                Visits=_visits(count, "dkdv", B * Hkv * triton.cdiv(Lk, MIN_BLOCK), delta), **args)
        if bcast:
            _bias_grad(q, k, v, ptrs, do, lse, delta, row_scale, dbias, common, B, H, Lq, Lk, args)


# The broadcast-dbias kernel holds q, do, k, v and two score tiles: small tiles, the least spilling measured on
# sm_90 per (element size, head-dim block) (none up to d 128 with fp16/bf16 and d 64 with fp32; 32x32 at d 128,
# the old tile, spilled 1.4 KB).
_DBIAS_TILES = {2: {32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (32, 16, 4, 2), 256: (32, 16, 4, 2)},
                4: {32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (32, 16, 4, 2), 256: (32, 16, 4, 2)}}


def dbias_config(dtype, head_dim):
    """The tile of the broadcast-dbias kernel for dtype and head_dim."""
    if INTERPRET:
        return triton.Config({"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}, num_warps=4, num_stages=1)
    size = 4 if torch.tensor([], dtype=dtype).element_size() >= 4 else 2
    m, n, w, s = _DBIAS_TILES[size][max(32, triton.next_power_of_2(head_dim))]
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _bias_grad(q, k, v, ptrs, do, lse, delta, row_scale, dbias, common, B, H, Lq, Lk, args):
    """dbias of a broadcast bias: one program per dbias tile (a broadcast query / key dim is one tile)."""
    all_b, all_h, all_m, all_n = (n == 1 and full > 1 for n, full in zip(dbias.shape, (B, H, Lq, Lk)))
    config = dbias_config(q.dtype, q.shape[-1])
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    slots = (1 if all_b else B) * (1 if all_h else H)
    for slot0 in range(0, slots, MAX_GRID_YZ):
        grid = (1 if all_m else triton.cdiv(Lq, bm), 1 if all_n else triton.cdiv(Lk, bn),
                min(slots - slot0, MAX_GRID_YZ))
        _bwd_dbias_kernel[grid](q, k, v, *ptrs, do, lse, delta, row_scale, dbias, *common, *dbias.stride(), B,
                                slot0, Visits=delta, **args, ALL_B=all_b, ALL_H=all_h, ALL_M=all_m, ALL_N=all_n,
                                **config.all_kwargs())


def _fp32(x: float) -> float:
    """``x`` rounded to fp32, as a Python float: the kernels type a float argument fp32 on a GPU, but Triton's
    interpreter computes with its fp64 value; rounded first, both draw the same keep-mask (rand >= p)."""
    return float(torch.tensor(x, dtype=torch.float32))


def dropout_keep_scale(dropout_p: float) -> float:
    """1 − p rounded once to fp32 (1 − fl32(p) in fp32 is up to 2.4e-7 off for p = 0.9, ×2.4 the fp32 rule's
    allowance in out): the kernels' normaliser l·(1 − p) and dV's p / (1 − p), and through 1 / it the r·v of
    ops.attention._dp_values, which the backward's exact cancellations rely on."""
    return _fp32(1.0 - float(dropout_p))


def dropout_mask(B, H, Lq, Lk, dropout_p, seed, device):
    """The bool keep-mask [B, H, Lq, Lk] the kernels apply for (dropout_p, seed); Lq, Lk: max_seqlen for packed
    batches, whose sequence b uses the top-left [len_q(b), len_k(b)] corner of mask[b]."""
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.uint8, device=device)
    with device_ctx(keep):
        for bh0 in range(0, B * H, MAX_GRID_YZ):
            grid = (triton.cdiv(Lq, 32), triton.cdiv(Lk, 32), min(B * H - bh0, MAX_GRID_YZ))
            _dropout_mask_kernel[grid](keep, int(seed), _fp32(dropout_p), Lq, Lk, bh0, BLOCK_M=32, BLOCK_N=32)
    return keep.view(torch.bool)
