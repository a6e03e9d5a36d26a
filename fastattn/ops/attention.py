"""Fused attention: argument checks, the ``fastattn::attention_fwd/bwd`` custom ops, and the public functions.

    out = softmax(q·kᵀ·scale + bias, over visible keys) · v

See fastattn.masks for the canonical mask form and README for the mask conventions.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from .. import dispatch, masks, reference
from .common import (REFERENCE_BACKENDS, autocast_to, check_kernel_dtype, check_no_forward_ad, check_same,
                     check_tensor, empty, empty_like, forward_ad, kernels_take, lastdim_contiguous, upcast)

MAX_HEAD_DIM = 256
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def _kernels(backend: str):
    return dispatch.kernels("attention", backend)


# --------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                   kv_lens: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, bottom_right: bool,
                   window_left: int, window_right: int, alibi: Optional[Tensor], softcap: float, dropout_p: float,
                   seed: Optional[Tensor], sinks: Optional[Tensor], backend: str,
                   residual: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out, lse2, out_lo): lse2 = log2 Σ_j exp(s_ij), [B, H, Lq] ([H, total_q] packed), +inf for rows with no
    visible key; float32, float64 for float32 inputs (_lse_dtype). With ``residual`` (fp16/bf16 inputs that need a
    gradient), out_lo = what rounding the output to its dtype dropped, for the backward's D_i = do_i·o_i; else
    empty. ``sinks`` join each row's softmax after the kernels (_apply_sinks)."""
    q, k, v = (lastdim_contiguous(t) for t in (q, k, v))  # the kernels index the last dim with stride 1
    out = empty_like(q)
    lse2 = empty(_lse_shape(q, cu_seqlens_q), like=q, dtype=_lse_dtype(q))
    out_lo = empty_like(q) if residual else None
    _kernels(backend).forward(q, k, v, bias, mask, kv_lens, out, lse2, scale, causal, bottom_right,
                              **_features(window_left, window_right, alibi, softcap, dropout_p, seed,
                                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out_lo=out_lo))
    if sinks is not None:
        _apply_sinks(out, lse2, out_lo, sinks)
    return out, lse2, (out_lo if residual else q.new_empty(0))


def check_sinks(sinks: Optional[Tensor], q: Tensor, H: int) -> None:
    """``sinks``, when given: a floating-point tensor of shape (H,) on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor of shape (H,), got "
                        f"{getattr(sinks, 'dtype', type(sinks).__name__)}")
    check_same(q, "q", sinks, "sinks", dtype=False)
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape (H,)=({H},), one logit per query head, got {tuple(sinks.shape)}")


def _per_head(x: Tensor, lse2: Tensor) -> Tensor:
    """[H] shaped to broadcast against a per-row tensor laid out as lse2 ([B, H, Lq] or [H, total_q])."""
    return x.view(1, -1, 1) if lse2.dim() == 3 else x.view(-1, 1)


def _sink_logits2(sinks: Tensor, lse2: Tensor) -> Tensor:
    """sinks [H] in log2 units, in lse2's dtype, shaped to broadcast against lse2."""
    return _per_head(sinks.to(lse2.dtype) * LOG2E, lse2)


def _rows_to_out(x: Tensor, out: Tensor) -> Tensor:
    """A per-row tensor laid out as lse2 ([B, H, Lq] or [H, total_q]) -> broadcastable against out."""
    return (x if out.dim() == 4 else x.transpose(0, 1)).unsqueeze(-1)


def _apply_sinks(out: Tensor, lse2: Tensor, out_lo: Optional[Tensor], sinks: Tensor) -> None:
    """In place: each row's softmax gains the term 2^σ (σ = sinks[h]·log2 e), which has no value, so
    out ← w·out with w = 2^lse2 / (2^lse2 + 2^σ), and lse2 ← log2(2^lse2 + 2^σ) (σ for a row with no visible key;
    +inf stays when σ = −inf). Exactly the sink-aware softmax's output and LSE, so the kernels' backward, given
    these, is the sink-aware one (its p_ij = 2^(s_ij − lse2) already carries the sink's share); the sinks' own
    gradient is _sink_row_grad's. One pass over the output, in fp32 (fp64 for fp32/fp64 outputs: rounded once),
    from the unrounded output where out_lo holds what rounding dropped."""
    sink2 = _sink_logits2(sinks, lse2)
    empty = torch.isposinf(lse2)
    new = torch.where(empty, torch.where(torch.isneginf(sink2), float("inf"), sink2), torch.logaddexp2(lse2, sink2))
    w = _rows_to_out(torch.where(empty, 0.0, torch.exp2(lse2 - new)), out)
    scaled = out.double() if out.dtype in (torch.float32, torch.float64) else out.float()  # one temporary
    if out_lo is not None:
        scaled.add_(out_lo)
    scaled.mul_(w.to(scaled.dtype))
    out.copy_(scaled)
    if out_lo is not None:
        out_lo.copy_(scaled.sub_(out))
    lse2.copy_(new)


def _lse_shape(q, cu_seqlens_q):
    return (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else q.shape[:3]


def _features(window_left, window_right, alibi, softcap, dropout_p, seed, cu_q, cu_k, max_q, max_k,
              out_lo=None) -> dict:
    """Keyword arguments of the kernels for the options in use (none: backends without them still run)."""
    kw = {} if out_lo is None else {"out_lo": out_lo}
    if (window_left, window_right) != (-1, -1):
        kw["window"] = (window_left, window_right)
    if alibi is not None:
        kw["alibi"] = alibi
    if softcap > 0.0:
        kw["softcap"] = softcap
    if dropout_p > 0.0:
        kw["dropout"] = (dropout_p, int(seed.item()))  # a CPU tensor: no device sync
    if cu_q is not None:
        kw["varlen"] = (cu_q, cu_k, max_q, max_k)
    return kw


@_attention_fwd.register_fake
def _(q, k, v, bias, mask, kv_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
      bottom_right, window_left, window_right, alibi, softcap, dropout_p, seed, sinks, backend, residual):
    out = torch.empty_like(lastdim_contiguous(q))
    return (out, q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=_lse_dtype(q)),
            torch.empty_like(out) if residual else q.new_empty(0))


def _lse_dtype(q: Tensor) -> torch.dtype:
    """The saved lse2's dtype: fp64 for fp32 inputs, whose kernels form it in fp64. Rounded to fp32 in base 2, it
    would be rounded twice on its way to the natural LSE returned, and a row that a bias of finfo(float32).min
    hides entirely (lse ≈ −3.4e38: lse2 = lse·log2(e) overflows fp32) would get lse2 = −inf and NaN gradients."""
    return torch.float64 if q.dtype == torch.float32 else torch.float32


def _dp_values(v: Tensor, dropout_p: float, backend: str) -> Tensor:
    """fp32 with dropout: r·v rounded to v's dtype, r = 1 / (1 − p) in fp32 as the backend's forward forms it (its
    dropout_keep_scale): the V that the kernels' backward forms dp_ij = keep_ij·do_i·(r·v_j) from (V enters the
    backward through dp only; fp16/bf16 form r·(do_i·v_j), see the Triton kernels' _kept_dp). The forward's
    output of a row whose one visible key j gets p = 1 is o_i = r·v_j rounded the same way, and D_i = do_i·o_i
    comes out of the same dot as dp_ij, so dp_ij − D_i cancels exactly and the row's gradients are exactly 0, as
    the reference's are (do_i·v_j / (1 − p) rounds differently: rounding-sized gradients where none exist, past
    §5's bound in fp32)."""
    keep = torch.tensor(_kernels(backend).dropout_keep_scale(dropout_p), dtype=torch.float32)
    r = float(torch.ones((), dtype=torch.float32) / keep)  # an fp32 value: exact as a scalar
    return (v.float() * r).to(v.dtype)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, out_lo: Optional[Tensor], lse: Tensor,
                   dlse: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor], kv_lens: Optional[Tensor],
                   cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                   max_seqlen_k: int, scale: float, causal: bool, bottom_right: bool, window_left: int,
                   window_right: int, alibi: Optional[Tensor], softcap: float, dropout_p: float,
                   seed: Optional[Tensor], sinks: Optional[Tensor], bias_grad: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dbias, dsinks); dbias and dsinks empty when not asked for / without sinks."""
    q, k, v, out = (lastdim_contiguous(t) for t in (q, k, v, out))
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    # fp32 dbias shaped like the bias (the kernels sum ds over its broadcast dims); skipped blocks stay 0. A bias
    # of one key column is the LSE's alone (_row_bias_grad).
    by_kernels = bias_grad and bias.shape[-1] != 1
    ds = torch.zeros(bias.shape, device=q.device, dtype=torch.float32) if by_kernels else None
    if dropout_p > 0.0 and v.dtype == torch.float32:
        v = _dp_values(v, dropout_p, backend)
    # dlse: the kernels index it densely (autograd may hand a strided one, e.g. the gradient of a permuted view)
    dlse = dlse.contiguous() if dlse is not None else None
    extra = {}
    if sinks is not None and q.dtype == torch.float32:  # the fp32 D pass counts the sink's weight in Σ_j p_ij
        extra["sink_weight"] = _sink_weight(sinks, lse)
    _kernels(backend).backward(lastdim_contiguous(do), q, k, v, out, lse, dlse, bias, mask, kv_lens,
                               dq, dk, dv, ds, scale, causal, bottom_right,
                               **_features(window_left, window_right, alibi, softcap, dropout_p, seed,
                                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           out_lo=lastdim_contiguous(out_lo) if out_lo is not None else None),
                               **extra)
    row_sink = _sink_row_grad(do, out, out_lo, lse, dlse, sinks) if sinks is not None else None
    dsinks = q.new_empty(0) if row_sink is None else (
        row_sink.sum((0, 2) if lse.dim() == 3 else 1).to(sinks.dtype))
    if bias_grad and not by_kernels:
        return dq, dk, dv, _row_bias_grad(bias, lse, dlse, row_sink), dsinks
    return dq, dk, dv, (q.new_empty(0) if ds is None else ds.to(bias.dtype)), dsinks


def _sink_row_grad(do: Tensor, out: Tensor, out_lo: Optional[Tensor], lse2: Tensor, dlse2: Optional[Tensor],
                   sinks: Tensor) -> Tensor:
    """Row i's share of the gradient of its head's sink logit σ: with p_σ = e^(σ − LSE_i) the sink's weight,
    ∂LSE_i/∂σ = p_σ and ∂o_i/∂σ = −p_σ·o_i, so dσ_i = p_σ·(dLSE_i − D_i), D_i = do_i·o_i (from the unrounded
    output). float64, laid out as lse2."""
    # one temporary (a copy also for fp64, where .double() would be ``out`` itself and mul_ would overwrite it)
    prod = out.to(torch.float64, copy=True) if out_lo is None else out.float().add_(out_lo)
    d = prod.mul_(do).sum(-1).double()
    d = d if out.dim() == 4 else d.transpose(0, 1)
    p_sink = torch.exp2(_sink_logits2(sinks, lse2).double() - lse2.double())
    dlse = 0.0 if dlse2 is None else dlse2.double() / LN2
    return torch.where(p_sink == 0.0, 0.0, p_sink * (dlse - d))


def _sink_weight(sinks: Tensor, lse2: Tensor) -> Tensor:
    """fp32 p_σ = e^(σ − r_i) per row, with r_i = lse2_i·ln 2 rounded to fp32 as the fp32 kernels recompute the
    weights from it: the sink's weight carries r's rounding as the keys' weights do, so the D pass's
    normalisation by Σ_j p_ij + p_σ cancels it for all of them alike."""
    r = (lse2.double() * LN2).float().double()
    return torch.where(torch.isposinf(r), 0.0, torch.exp(_per_head(sinks.double(), lse2) - r)).float()


def _row_bias_grad(bias: Tensor, lse2: Tensor, dlse2: Optional[Tensor], row_sink: Optional[Tensor]) -> Tensor:
    """The gradient of a bias of one key column ([B|1, H|1, Lq|1, 1]): it adds the same to every score of a row,
    which the softmax ignores and the LSE takes whole, so it is the LSE's gradient, dLSE_i = dlse2_i / ln 2 (0 for
    a row without a visible key), summed over the bias's broadcast dims: exact, where Σ_j ds_ij cancels only up to
    rounding (fp16/bf16 form D from the rounded output: 9 times the reference's error for a scalar bias). With
    sinks, which the bias does not shift, minus the sink's share: adding c to every score and to σ changes
    nothing but the LSE, so Σ_j ds_ij = dLSE_i − dσ_i."""
    if dlse2 is None and row_sink is None:
        return torch.zeros(bias.shape, device=bias.device, dtype=bias.dtype)
    g = torch.zeros_like(lse2, dtype=torch.float64) if dlse2 is None else torch.where(
        torch.isinf(lse2), 0.0, dlse2.double() / LN2)
    if row_sink is not None:
        g = g - row_sink
    g = g.unsqueeze(-1)
    dims = [d for d in range(3) if bias.shape[d] == 1 < g.shape[d]]
    return (g.sum(dims, keepdim=True) if dims else g).to(bias.dtype)


@_attention_bwd.register_fake
def _(do, q, k, v, out, out_lo, lse, dlse, bias, mask, kv_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, scale, causal, bottom_right, window_left, window_right, alibi, softcap, dropout_p, seed, sinks,
      bias_grad, backend):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)  # contiguous, as the real one
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty(0)
    return tuple(torch.empty_like(lastdim_contiguous(t)) for t in (q, k, v)) + (dbias, dsinks)


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, mask, kv_lens, cu_q, cu_k, max_q, max_k, scale, causal, bottom_right, window_left,
     window_right, alibi, softcap, dropout_p, seed, sinks, backend, _residual) = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(q, k, v, bias, mask, kv_lens, cu_q, cu_k, alibi, seed, sinks, out, lse,
                          out_lo if out_lo.numel() else None)
    ctx.params = (max_q, max_k, scale, causal, bottom_right, window_left, window_right)
    ctx.options = (softcap, dropout_p)
    ctx.backend = backend


def _backward(ctx, dout, dlse, _dout_lo):
    q, k, v, bias, mask, kv_lens, cu_q, cu_k, alibi, seed, sinks, out, lse, out_lo = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias, dsinks = _attention_bwd(dout, q, k, v, out, out_lo, lse, dlse, bias, mask, kv_lens, cu_q,
                                               cu_k, *ctx.params, alibi, *ctx.options, seed, sinks, bias_grad,
                                               ctx.backend)
    sinks_grad = sinks is not None and ctx.needs_input_grad[19]
    return ((dq, dk, dv, (dbias if bias_grad else None)) + (None,) * 15 + ((dsinks if sinks_grad else None),)
            + (None,) * 2)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- "torch" backend
# The "torch" backend (the CPU default, and on a GPU the fallback for fp64 and head dims > 256) runs torch's own
# SDPA where it computes the call (on the CPU its flash kernel: memory linear in L), and otherwise the reference
# on chunks of query rows of at most this many scores, each recomputed in the backward (torch.utils.checkpoint):
# the reference holds several B·H·Lq·Lk tensors and autograd keeps them, 8 GB each at B·H = 128, L = 4096, fp32.
TORCH_CHUNK_SCORES = 1 << 24


def _eager(*tensors) -> bool:
    """Not under torch.func transforms or forward-mode AD, which neither checkpointing nor SDPA's CPU flash
    backward take."""
    if torch.compiler.is_compiling():  # (no such transform reaches a trace)
        return True
    return torch._C._functorch.peek_interpreter_stack() is None and not any(forward_ad(t) for t in tensors)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], attn_bias: Optional[Tensor],
          kv_lens: Optional[Tensor], causal: bool, bottom_right: bool, scale: float) -> Optional[Tensor]:
    """torch's SDPA on the call (fp16/bf16 in fp32, fp32 in fp64), or None where it would not give the reference's
    answer in little memory: a mask of more than TORCH_CHUNK_SCORES elements, or a float bias whose largest score
    in some row is huge (Hugging Face's finfo.min masks: SDPA's LSE then absorbs log Lk, and its backward takes
    p = 1 for 1/Lk)."""
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[-1]
    wide = torch.float64 if q.dtype == torch.float32 else upcast("torch", q).dtype
    # SDPA takes is_causal (top-left) or a mask, not both: causal with masks, padding, a bias or another diagonal
    # becomes one mask, of the broadcast shape of its parts
    is_causal = (causal and attn_mask is None and attn_bias is None and kv_lens is None
                 and (not bottom_right or Lq == Lk))
    parts = [t.shape for t in (attn_mask, attn_bias) if t is not None] + [(B, 1, 1, Lk)] * (kv_lens is not None)
    parts += [(B, 1, Lq, Lk)] * (causal and not is_causal)
    if parts and math.prod(torch.broadcast_shapes(*parts)) > TORCH_CHUNK_SCORES:
        return None
    mask = reference.visible_keys(B, Lq, Lk, device=q.device, causal=causal and not is_causal,
                                  bottom_right=bottom_right, attn_mask=attn_mask, kv_lens=kv_lens)
    if attn_bias is not None:
        mask = attn_bias.to(wide) if mask is None else attn_bias.to(wide).masked_fill(~mask, float("-inf"))
        top = mask.amax(-1)
        if torch.compiler.is_compiling() or bool((top.isfinite() & (top.abs() > 1 / (64 * torch.finfo(wide).eps)))
                                                 .any()):
            return None
    width = max(D, Dv)  # its flash kernel takes one head dim: the narrower side zero-padded, as the kernels'
    q, k, v = (F.pad(t.to(wide), (0, width - t.shape[-1])) if t.shape[-1] < width else t.to(wide) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=k.shape[1] != H)
    # It returns 0 for a query row holding NaN (at some lengths), where the scores (and the reference) are NaN.
    out = out.masked_fill(~torch.isfinite(q).all(-1, keepdim=True), float("nan"))
    # Its backward forms D_i from the output, so a row with one visible key (p = 1: the exact dq_i and its share
    # of dk are 0) or none gets gradients of 1e-7 (fp32) instead: those rows take do = 0 here, and a one-key row
    # is computed as the reference does, p = softmax([s]) = (s − s) + 1 (NaN for s = ±inf or NaN; no gradient to
    # s) times the key's value. n: visible keys per row; j: the first one.
    if mask is not None:
        live = mask if mask.dtype == torch.bool else mask != float("-inf")
        n, j = live.sum(-1, keepdim=True) * (Lk // live.shape[-1]), live.to(torch.uint8).argmax(-1)
    else:
        i = torch.arange(Lq, device=q.device).view(1, 1, Lq, 1)
        n, j = (i + 1).clamp(max=Lk) if is_causal else torch.full_like(i, Lk), torch.zeros_like(i[..., 0])
    at = (torch.arange(B, device=q.device).view(B, 1, 1),
          torch.arange(H, device=q.device).view(1, H, 1) // (H // k.shape[1]), j.expand(B, H, Lq))
    s = (q * k[at]).sum(-1, keepdim=True) * scale
    if mask is not None and mask.is_floating_point():
        s = s + mask.expand(B, H, Lq, mask.shape[-1]).gather(-1, j.expand(B, H, Lq).unsqueeze(-1))
    p = torch.where(n == 1, (s - s) + 1, 0.0)  # 0 elsewhere: their s may be ±inf, and 0 · NaN in the backward
    out = torch.where(n == 1, p * v[at], out.masked_fill(n <= 1, 0.0))
    return out[..., :Dv] if Dv < width else out


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Optional[Tensor] = None,
                     attn_bias: Optional[Tensor] = None, kv_lens: Optional[Tensor] = None, causal: bool = False,
                     bottom_right: bool = False, scale: float, dropout_p: float = 0.0,
                     dropout_mask: Optional[Tensor] = None, return_lse: bool = False,
                     window_size: tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
                     softcap: float = 0.0, sinks: Optional[Tensor] = None):
    """The "torch" backend: :func:`fastattn.reference.attention`'s arguments and result, in a wider dtype (fp16 and
    bf16 in fp32; fp32 in fp64 on SDPA, whose CPU backward in fp32 misses the §5 rule for dq by up to 4 times: its
    D_i comes from the rounded output). With ``dropout_p`` > 0 and no ``dropout_mask`` it draws its own keep-mask
    (torch.rand: torch.manual_seed reproduces it)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if kv_lens is not None:  # keys past kv_lens are never read, as by the kernels (0 · NaN would be read)
        pad = (torch.arange(Lk, device=q.device) >= kv_lens.long().view(B, 1, 1)).unsqueeze(-1)
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    left, right = window_size
    window = left >= 0 or right >= 0 and not (causal and right == 0)  # causal=True comes with right = 0
    extras = dropout_p > 0.0 or return_lse or window or alibi_slopes is not None or softcap > 0.0 or sinks is not None
    if (q.device.type == "cpu" and not extras and q.numel() and k.numel()
            and not (attn_bias is not None and attn_bias.requires_grad) and _eager(q, k, v, attn_bias)):
        out = _sdpa(q, k, v, attn_mask, attn_bias, kv_lens, causal, bottom_right, scale)
        if out is not None:
            return out
    q, k, v, attn_bias, sinks = (upcast("torch", t) for t in (q, k, v, attn_bias, sinks))
    kw = dict(kv_lens=kv_lens, causal=causal, bottom_right=bottom_right, scale=scale, dropout_p=dropout_p,
              return_lse=return_lse, window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
              sinks=sinks, q_total=Lq, k_total=Lk)
    rows = max(1, TORCH_CHUNK_SCORES // max(1, B * H * Lk))

    def run(q_rows, k_cols, v_cols, i0, k0, mask_part, bias_part, keep):
        if keep is None and dropout_p > 0.0:
            keep = torch.rand((B, H, q_rows.shape[2], k_cols.shape[2]), device=q.device) >= dropout_p
        return reference.attention(q_rows, k_cols, v_cols, attn_mask=mask_part, attn_bias=bias_part,
                                   dropout_mask=keep, q_start=i0, k_start=k0, **kw)
    if rows >= Lq or torch.compiler.is_compiling() or not _eager(q, k, v, attn_bias, sinks):
        return run(q, k, v, 0, 0, attn_mask, attn_bias, dropout_mask)
    if k.shape[1] != H:  # GQA: K/V repeated once, not once per chunk
        k, v = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k, v))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, attn_bias, sinks))
    # A chunk computes only the keys its rows' diagonals reach, d(i) − left ≤ j ≤ d(i) + right, with
    # d(i) = i + s_b, s_b = 0 (top-left) or Lk_b − Lq: O(L·w) work for a window w, half the scores if causal.
    right = 0 if causal else right
    lk = (Lk, Lk) if kv_lens is None or not bottom_right else tuple(torch.stack(torch.aminmax(kv_lens)).tolist())
    shift = (lk[0] - Lq, lk[1] - Lq) if bottom_right else (0, 0)
    results = []
    for i0 in range(0, Lq, rows):
        i1 = min(Lq, i0 + rows)
        k0 = max(0, i0 + shift[0] - left) if left >= 0 else 0
        k1 = max(k0, min(Lk, i1 + shift[1] + right)) if right >= 0 else Lk
        part = [q[:, :, i0:i1], k[:, :, k0:k1], v[:, :, k0:k1], i0, k0] + [
            None if t is None else t[:, :, slice(i0, i1) if t.shape[2] > 1 else slice(None),
                                     slice(k0, k1) if t.shape[3] > 1 else slice(None)]
            for t in (attn_mask, attn_bias, dropout_mask)]
        # the backward recomputes each chunk in turn (and its dropout draw, from the saved RNG state)
        results.append(torch.utils.checkpoint.checkpoint(run, *part, use_reentrant=False) if grad else run(*part))
    if not return_lse:
        return torch.cat(results, dim=2)
    return torch.cat([r[0] for r in results], dim=2), torch.cat([r[1] for r in results], dim=2)


# --------------------------------------------------------------------------------------------- public API
def _check_inputs(q, k, v):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name, dim=4)
    check_same(q, "q", k, "k")
    check_same(q, "q", v, "v")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (B, Hkv, Lk)")
    if k.shape[3] != D:  # v's may differ (as SDPA's: e.g. multi-head latent attention, 192 and 128)
        raise ValueError(f"head dims of q and k differ: q {D}, k {k.shape[3]}")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"head dim of q, k and v must be >= 1, got shapes {tuple(q.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError(f"k and v must have at least one head, got shape {tuple(k.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"q's {H} heads must be a multiple of k/v's {k.shape[1]} heads (GQA)")


def check_kv_lens(kv_lens, q: Tensor, B: Optional[int]) -> None:
    """kv_lens: an int32/int64 tensor [B] (B None: any 1-d) on q's device (its values are the caller's to check
    against Lk)."""
    if not isinstance(kv_lens, Tensor) or kv_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError("kv_lens must be an int32 (or int64) tensor of shape (B,)")
    check_same(q, "q", kv_lens, "kv_lens", dtype=False)
    if kv_lens.dim() != 1 or (B is not None and kv_lens.shape[0] != B):
        raise ValueError(f"kv_lens must have shape (B,){'' if B is None else f'=({B},)'}, got {tuple(kv_lens.shape)}")


def _canonical_masks(q, k, key_padding_mask, kv_lens, attn_bias):
    """-> (bias, mask, kv_lens) in fastattn.masks' canonical form."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    full = (B, H, Lq, Lk)
    bias = mask = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor (B, Lk), got {type(key_padding_mask).__name__}")
        check_same(q, "q", key_padding_mask, "key_padding_mask", dtype=False)
        mask = masks.key_padding_mask_to_mask(key_padding_mask, B, Lk, true_means="ignore")
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor):
            raise TypeError(f"attn_bias must be a tensor, got {type(attn_bias).__name__}")
        check_same(q, "q", attn_bias, "attn_bias", dtype=False)
        if attn_bias.dtype == torch.bool:
            mask = masks.and_masks(mask, masks.as_4d(attn_bias, "attn_bias", full))
        elif attn_bias.is_floating_point():
            bias = masks.as_4d(attn_bias, "attn_bias", full)
        else:
            raise TypeError(f"attn_bias must be a bool mask or a floating-point bias, got {attn_bias.dtype}")
    if kv_lens is not None:
        check_kv_lens(kv_lens, q, B)
        if not torch.compiler.is_compiling() and B > 0:  # a host sync; skipped while tracing
            lo, hi = torch.stack(torch.aminmax(kv_lens)).tolist()
            if lo < 0 or hi > Lk:
                raise ValueError(f"kv_lens must lie in [0, Lk={Lk}], got values in [{lo}, {hi}]")
        kv_lens = kv_lens.to(torch.int32).contiguous()
    return bias, mask, kv_lens


def _check_features(q, B, H, window_size, alibi_slopes, softcap):
    """-> (left, right, slopes as float32 [1|B, H] or None, softcap) after checking each argument."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1
                       for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                         f"got {window_size!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be a float32 tensor, got "
                            f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
        check_same(q, "q", alibi_slopes, "alibi_slopes", dtype=False)
        if tuple(alibi_slopes.shape) not in ((H,), (1, H), (B, H)):
            raise ValueError(f"alibi_slopes must have shape (H,)=({H},), (1, H) or (B, H)=({B}, {H}), "
                             f"got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.reshape(-1, H).contiguous()
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap >= 0.0 \
            or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    return int(window_size[0]), int(window_size[1]), alibi_slopes, float(softcap)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask, kv_lens,
                  attn_bias):
    """Packed batch: q [total_q, H, D], k/v [total_k, Hkv, D], int32 cumulative lengths [B + 1]. -> B."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("packed varlen attention needs both cu_seqlens_q and cu_seqlens_k")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name, dim=3)
    for t, name in ((k, "k"), (v, "v")):
        check_same(q, "q", t, name)
    if k.shape[:2] != v.shape[:2]:  # v's head dim may differ, as in the padded layout
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (total_k, Hkv)")
    _check_inputs(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2))
    for t, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < 2:
            raise TypeError(f"{name} must be an int32 tensor of shape (B + 1,) for B >= 1 sequences, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        check_same(q, "q", t, name, dtype=False)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         "must both have B + 1 entries")
    for m, name in ((max_seqlen_q, "max_seqlen_q"), (max_seqlen_k, "max_seqlen_k")):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{name} must be a Python int >= 0 (the longest sequence), got {m!r}")
    for x, name in ((key_padding_mask, "key_padding_mask"), (kv_lens, "kv_lens"), (attn_bias, "attn_bias")):
        if x is not None:
            raise ValueError(f"{name} cannot be combined with packed varlen batches (cu_seqlens): "
                             "the packing already removes the padding")
    if not torch.compiler.is_compiling():  # a host sync; skipped while tracing
        for cu, total, m, name in ((cu_seqlens_q, q.shape[0], max_seqlen_q, "q"),
                                   (cu_seqlens_k, k.shape[0], max_seqlen_k, "k")):
            lens = cu.diff()
            first, last, shortest, longest = torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).tolist()
            if first != 0 or last != total or shortest < 0:
                raise ValueError(f"cu_seqlens_{name} must rise from 0 to total_{name} = {total}, got "
                                 f"{cu.tolist() if cu.numel() <= 16 else '…'}")
            if longest > m:
                raise ValueError(f"max_seqlen_{name} = {m} but a sequence has {longest} tokens")
    return cu_seqlens_q.shape[0] - 1


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, causal_alignment: str = "top_left",
              key_padding_mask: Optional[Tensor] = None, kv_lens: Optional[Tensor] = None,
              cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              attn_bias: Optional[Tensor] = None, window_size: tuple[int, int] = (-1, -1),
              alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0, sinks: Optional[Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, return_lse: bool = False,
              return_dropout_mask: bool = False, dropout_mask: Optional[Tensor] = None, deterministic: bool = True,
              backend: str = "auto"):
    """Fused attention ``softmax(q·kᵀ·scale + attn_bias) · v`` over the visible keys.

    q/k: [B, H|Hkv, Lq|Lk, D], v: [B, Hkv, Lk, Dv] with H % Hkv == 0 (GQA/MQA), D, Dv <= 256 (Dv ≠ D as SDPA
    allows: the kernels run the narrower side zero-padded).
    causal: key j visible to query i iff j <= d(i); d(i) = i for ``causal_alignment="top_left"`` (SDPA's
    is_causal), i + Lk_b − Lq for ``"bottom_right"`` (FlashAttention's; Lk_b = kv_lens[b] when given, else Lk).
    key_padding_mask: bool [B, Lk], True = padding, ignored (nn.MultiheadAttention's convention).
    kv_lens: int [B], keys j >= kv_lens[b] ignored (the fast form of right padding).
    cu_seqlens_q / cu_seqlens_k: int32 [B + 1], packed variable-length batch: q [total_q, H, D], k/v
    [total_k, Hkv, D], sequence b in rows cu[b] .. cu[b+1] (see :func:`fastattn.unpad`); ``max_seqlen_q/k``
    (Python ints) bound the lengths. Every option except masks, kv_lens and attn_bias applies per sequence.
    attn_bias: float, added to the scaled scores, or bool, True = attend; broadcastable to [B, H, Lq, Lk];
    a float bias that requires grad gets its gradient.
    window_size: (left, right), −1 = unbounded: key j visible iff d(i) − left <= j <= d(i) + right, d(i) the
    diagonal above; causal=True sets right = 0. Key blocks outside every row's window are skipped.
    alibi_slopes: float32 [H], [1, H] or [B, H]; adds −slope·|d(i) − j| to the scaled score (no gradient).
    softcap: c > 0 maps the scaled score s to c·tanh(s/c) before attn_bias, ALiBi and masks.
    sinks: float [H], learnable attention sinks (GPT-OSS): each row of query head h gets one more logit, sinks[h]
    (not scaled, capped, biased or masked), that takes part in the softmax and has no value, so the weights sum to
    1 − p_sink; it gets its gradient. The kernels run unchanged and the output and LSE are rescaled after them
    (one pass over the output); the LSE returned includes the sink, and a row with no visible key gives 0 with
    LSE sinks[h].
    dropout_p: p in (0, 1] drops each attention weight with probability p and scales the kept ones by 1/(1 − p)
    (as torch; pass 0 in eval; p = 1 gives out = 0). The kernels draw the mask from Philox counters seeded from
    torch's CPU generator (``torch.manual_seed`` reproduces it) and the backward regenerates it: no mask in
    memory.
    For the backward the kernels save q, k, v, the output and its LSE, and for fp16/bf16 also what rounding the
    output dropped (one more output-sized tensor: the backward's D_i = do_i·o_i then has the unrounded o_i,
    README Numerics); nothing more is kept when no gradient is needed.
    A query row with no visible key returns 0 (gradients 0). With ``return_lse`` also returns the
    log-sum-exp of each row, float32 (float64 for float64 inputs) [B, H, Lq] ([H, total_q] packed), +inf for
    empty rows. With ``return_dropout_mask`` (debugging, tests) also returns the bool keep-mask [B, H, Lq, Lk]
    that was applied ([B, H, max_seqlen_q, max_seqlen_k] packed, sequence b in the top-left corner of mask[b]).
    ``dropout_mask`` (tests): apply this bool keep-mask, shaped as returned, instead of drawing one; backends
    "torch" and "reference" only (the kernels draw theirs), so a kernel's mask can be replayed on the reference.
    deterministic: accepted as FlashAttention takes it; every backward here is deterministic (no atomics: the
    same inputs give the same bits), whichever is asked.
    backend: "auto" (Triton on CUDA tensors, "torch" on the CPU and where the kernels cannot run), "triton",
    "cuda", or "torch" (torch's SDPA where it computes the call, else fastattn.reference over chunks of query
    rows recomputed in the backward: memory linear in L; fp16/bf16 computed in fp32, fp32 on SDPA in fp64), or
    "reference" (fastattn.reference whole, in the input dtype: the §5 baseline; it has a double backward).
    """
    casts = [autocast_to(t, "lower") for t in (q, k, v, attn_bias)]
    if any(casts[:3]):  # as SDPA under CUDA autocast: q, k, v and a float bias cast to the autocast dtype (fp32
        # would run the fp32 kernels: slower, and unlike torch)
        q, k, v, attn_bias = (t.to(c) if c else t for t, c in zip((q, k, v, attn_bias), casts))
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        B = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_padding_mask,
                          kv_lens, attn_bias)
        H, Lq, Lk = q.shape[1], max_seqlen_q, max_seqlen_k
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # read densely
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q / max_seqlen_k belong to packed batches: give cu_seqlens_q/k too")
        _check_inputs(q, k, v)
        B, H, Lq = q.shape[:3]
        Lk = k.shape[2]
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if dropout_mask is not None and dropout_p == 0.0:
        raise ValueError("dropout_mask replays a dropout: it needs dropout_p > 0 (the p it was drawn with)")
    # p = 1 drops every weight: out = 0 (torch's dropout(p=1) and SDPA), the LSE that of the scores before dropout
    drop_all = dropout_p == 1.0
    dropout_p = 0.0 if drop_all else float(dropout_p)
    left, right, alibi, softcap = _check_features(q, B, H, window_size, alibi_slopes, softcap)
    check_sinks(sinks, q, H)
    # |j − d(i)| < Lq + Lk: a wider side is unbounded, and as −1 it cannot overflow the kernels' int32 indices
    left, right = (-1 if w >= Lq + Lk else w for w in (left, right))
    bias, mask, kv_lens = (None, None, None) if varlen else _canonical_masks(q, k, key_padding_mask, kv_lens,
                                                                             attn_bias)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float (None: 1/sqrt(head dim)), got {scale!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal = bool(causal)
    if causal:
        right = 0
    # The alignment matters wherever the diagonal d(i) is used.
    uses_diagonal = causal or left >= 0 or right >= 0 or alibi is not None
    bottom_right = uses_diagonal and causal_alignment == "bottom_right"

    D, Dv = q.shape[-1], v.shape[-1]
    # sinks (any float dtype: they never reach the kernels) and ALiBi's slopes take no forward-mode tangent either
    use = dispatch.select(backend, q, lambda b: max(D, Dv) <= MAX_HEAD_DIM and kernels_take(
        (q, "q"), (k, "k"), (v, "v"), (bias, "attn_bias"))(b) and not (b == "cuda" and q.dtype == torch.float32)
        and not forward_ad(sinks) and not forward_ad(alibi))
    if dropout_mask is not None:
        if use not in REFERENCE_BACKENDS:
            raise ValueError(f"dropout_mask is replayed by backend 'torch' only; backend {use!r} draws its own")
        if (not isinstance(dropout_mask, Tensor) or dropout_mask.dtype != torch.bool
                or tuple(dropout_mask.shape) != (B, H, Lq, Lk)):
            raise ValueError(f"dropout_mask must be a bool tensor of shape {(B, H, Lq, Lk)}, got "
                             f"{getattr(dropout_mask, 'dtype', type(dropout_mask).__name__)} "
                             f"{tuple(getattr(dropout_mask, 'shape', ()))}")
    if use in REFERENCE_BACKENDS or q.numel() == 0 or k.numel() == 0:
        # "torch" draws its keep-mask chunk by chunk (_torch_attention), unless it is returned
        # _torch_attention upcasts for itself, and draws its keep-mask chunk by chunk unless it is returned (or
        # a packed batch is traced: one padded batch then, reference.attention_varlen_padded)
        own = use == "torch" and not return_dropout_mask and not (varlen and torch.compiler.is_compiling())
        keep = dropout_mask
        if dropout_p > 0.0 and keep is None and not own:
            keep = torch.rand((B, H, Lq, Lk), device=q.device) >= dropout_p
        attend, up = (_torch_attention, lambda t: t) if own else (reference.attention, lambda t: upcast(use, t))
        kw = dict(causal=causal, bottom_right=bottom_right, scale=scale, dropout_p=dropout_p, dropout_mask=keep,
                  return_lse=return_lse, window_size=(left, right), alibi_slopes=alibi, softcap=softcap,
                  sinks=up(sinks))
        with torch.autocast(q.device.type, enabled=False):  # its policy is applied already (autocast_to)
            if varlen:
                result = reference.attention_varlen(up(q), up(k), up(v), cu_seqlens_q, cu_seqlens_k,
                                                    max_seqlen_q=Lq, max_seqlen_k=Lk, attend=attend, **kw)
            else:
                result = attend(up(q), up(k), up(v), attn_mask=mask, attn_bias=up(bias), kv_lens=kv_lens, **kw)
        result = (result[0].to(q.dtype), result[1]) if return_lse else result.to(q.dtype)
        if return_dropout_mask and keep is None:
            keep = torch.ones((B, H, Lq, Lk), dtype=torch.bool, device=q.device)
        return _results(result, return_lse, keep if return_dropout_mask else None, drop_all)
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"head dim {max(D, Dv)} of {'q' if D >= Dv else 'v'} is larger than {MAX_HEAD_DIM}, the "
                         f"most backend {use!r} takes (backend='torch' takes any)")
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (bias, "attn_bias")):
        if t is not None:
            check_kernel_dtype(t, name, use)
    check_no_forward_ad(sinks, "sinks", use)
    check_no_forward_ad(alibi, "alibi_slopes", use)
    seed = None
    if dropout_p > 0.0:
        # From torch's CPU generator: torch.manual_seed reproduces it, and reading it never syncs a GPU. Drawn
        # >= 2**31 so that Triton always types the argument int64 (one compiled kernel).
        seed = torch.randint(1 << 31, 1 << 62, (), dtype=torch.int64)
    if Dv != D:  # the kernels take one head dim: the narrower side zero-padded (scores and outputs unchanged;
        q, k, v = (F.pad(t, (0, max(D, Dv) - t.shape[-1])) if t.shape[-1] < max(D, Dv) else t  # the extra
                   for t in (q, k, v))  # columns dropped); F.pad by 0 would copy the wider side too
    # fp16/bf16 that will be differentiated keep what rounding the output dropped, for an exact D in the backward
    residual = q.dtype != torch.float32 and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias, sinks))
    out, lse2, _ = _attention_fwd(lastdim_contiguous(q), lastdim_contiguous(k), lastdim_contiguous(v), bias, mask,
                                  kv_lens, cu_seqlens_q, cu_seqlens_k, Lq if varlen else 0, Lk if varlen else 0,
                                  scale, causal, bottom_right, left, right, alibi, softcap, dropout_p, seed, sinks,
                                  use, residual)
    out = out[..., :Dv].contiguous() if Dv < D else out  # dense, as torch's; not a view keeping D columns alive
    keep = None
    if return_dropout_mask:
        keep = (_kernels(use).dropout_mask(B, H, Lq, Lk, dropout_p, int(seed), q.device) if seed is not None
                else torch.ones((B, H, Lq, Lk), dtype=torch.bool, device=q.device))
    # natural units, converted in fp64 and rounded once (an fp32 product would round LN2 and the product)
    return _results((out, (lse2.double() * LN2).float()) if return_lse else out, return_lse, keep, drop_all)


def _results(result, return_lse: bool, keep: Optional[Tensor], drop_all: bool = False):
    """out, [lse], [keep-mask], as ``attention`` returns them; ``drop_all`` (dropout_p = 1): out and the
    keep-mask all 0 (out · 0 keeps the autograd graph: the gradients through out are 0)."""
    if drop_all:
        result = (result[0] * 0.0, result[1]) if return_lse else result * 0.0
        keep = None if keep is None else torch.zeros_like(keep)
    if keep is None:
        return result
    return (*result, keep) if return_lse else (result, keep)


def _sdpa_broadcast(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """query, key and value (3 dims or more) broadcast as torch's SDPA does: every dim but (L, D), e.g. one K/V
    for a batch of queries or one K/V head for every query head; with ``enable_gqa`` every dim before the heads,
    whose groups it forms (K and V may then differ in heads: each is repeated to the query's, as torch's)."""
    keep = 3 if enable_gqa else 2
    try:
        lead = torch.broadcast_shapes(*(t.shape[:-keep] for t in (query, key, value)))
    except RuntimeError:
        hint = "" if enable_gqa else " (pass enable_gqa=True for GQA)"
        raise ValueError(f"the leading dims of query, key and value must broadcast, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}{hint}") from None
    kv_lead = lead
    if not enable_gqa and key.shape[-3] == value.shape[-3] == 1:  # one K/V head for all: GQA's case, read once
        kv_lead = (*lead[:-1], 1)
    query = query.expand(*lead, *query.shape[-keep:])
    key, value = (t.expand(*kv_lead, *t.shape[-keep:]) for t in (key, value))
    if enable_gqa and key.shape[-3] != value.shape[-3]:
        H = query.shape[-3]
        for t, name in ((key, "key"), (value, "value")):
            if H % t.shape[-3]:
                raise ValueError(f"query's {H} heads must be a multiple of {name}'s {t.shape[-3]} heads (GQA)")
        key, value = (t.repeat_interleave(H // t.shape[-3], dim=-3) for t in (key, value))
    return query, key, value


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, L, D), (B, L, D), (L, D) or, as
    torch, (N, ..., H, L, D) inputs (the leading dims run as one batch; they broadcast, as torch's).

    ``attn_mask``: bool (True = attend) or float (added), broadcastable to (..., H, Lq, Lk); ``is_causal`` is
    top-left. A row with no visible key gives 0 (gradients 0), never NaN.
    """
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        check_tensor(t, name)
    if query.dim() < 2:
        raise ValueError(f"query must be (B, H, L, D), (B, L, D), (L, D) or (N, ..., H, L, D), got shape "
                         f"{tuple(query.shape)}")
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"query, key and value must have the same number of dims, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if attn_mask is not None and (not isinstance(attn_mask, Tensor)
                                  or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point())):
        raise TypeError(f"attn_mask must be a bool (True = attend) or floating-point tensor, got "
                        f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
    if query.dim() == 2:  # (L, D): one sequence of one head
        return scaled_dot_product_attention(query[None], key[None], value[None], attn_mask, dropout_p, is_causal,
                                            scale, enable_gqa)[0]
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be given (as in torch)")
    if query.dim() >= 3:
        query, key, value = _sdpa_broadcast(query, key, value, enable_gqa)
    if query.dim() > 4:  # (N, ..., H, L, D): the leading dims flattened into one batch, and back
        lead = query.shape[:-3]
        n = math.prod(lead)
        query, key, value = (t.reshape(n, *t.shape[-3:]) for t in (query, key, value))
        if attn_mask is not None and attn_mask.dim() > 3:  # one of 3 dims or fewer broadcasts as it is
            if attn_mask.dim() > len(lead) + 3:
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} has more dims than query")
            m = attn_mask.reshape((1,) * (len(lead) + 3 - attn_mask.dim()) + tuple(attn_mask.shape))
            try:
                attn_mask = m.expand(*lead, *m.shape[-3:]).reshape(n, *m.shape[-3:])
            except RuntimeError:
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to query's "
                                 f"leading dims {tuple(lead)}") from None
        out = scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return out.reshape(*lead, *out.shape[-3:])
    squeeze = query.dim() == 3
    if squeeze:  # (H, L, D), as torch reads it (dim -3 holds the heads, which enable_gqa groups)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    if attn_mask is not None:  # named as the caller knows it before attention() sees it as attn_bias
        check_same(query, "query", attn_mask, "attn_mask", dtype=False)
        masks.as_4d(attn_mask, "attn_mask", (query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
    out = attention(query, key, value, causal=is_causal, attn_bias=attn_mask, scale=scale, dropout_p=dropout_p)
    return out.squeeze(0) if squeeze else out
