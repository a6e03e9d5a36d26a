"""CUDA C++ fused attention (csrc/attention/): the ``forward`` / ``backward`` / ``dropout_mask`` of
fastattn.triton.attention, same arguments and semantics (preallocated out / lse (base 2) and dq / dk / dv / ds),
including local attention (window_size), ALiBi and soft-capping (computed in the kernels from indices, key blocks
outside the window skipped), dropout (the same Philox keep-mask bit for bit, csrc/attention/philox.h) and packed
variable-length batches. Block counting (``count``, a test hook) is the Triton kernels' only. When its CTAs cannot
fill the GPU (decoding), the forward splits their keys and merges the splits by LSE, by the Triton backend's rule
(``num_splits`` on this backend's tiles; ``forced_splits`` applies here too); with GQA, decoding and short queries
read each kv head's K/V once for its query heads (:func:`pack_gqa`).

The kernels take fp16 / bf16 and head dims of ``HEAD_DIMS`` that ``_C.attention_supports_head_dim`` accepts;
other head dims run zero-padded to the next supported one (padding changes no score, and the padded output
columns are dropped). Rows are read with 16-byte vector loads: inputs whose data pointer or row strides are not
16-byte aligned are copied first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..triton.attention import _bcast_strides, _rows
from ..triton.attention import forced_layout, multiprocessors, num_splits
from ..triton.attention import pack_gqa as _pack_rule
from . import check_cuda, device_ctx, extension, ptr, stream

HEAD_DIMS = (32, 64, 96, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)


def padded_head_dim(D: int, like: Optional[torch.Tensor] = None) -> int:
    """The smallest head dim >= D the kernels (those that run ``like``'s device) support."""
    C = extension(like)
    for d in HEAD_DIMS:
        if d >= D and C.attention_supports_head_dim(d):
            return d
    supported = [d for d in HEAD_DIMS if C.attention_supports_head_dim(d)]
    raise NotImplementedError(f"backend 'cuda': no attention kernel for head dim {D} (built with {supported}); "
                              "use backend='triton'")


def _aligned(t: torch.Tensor) -> bool:
    esize = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(n == 1 or (s * esize) % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1])))


def _input(t: torch.Tensor, D: int) -> torch.Tensor:
    """t [.., d] zero-padded to D columns and 16-byte aligned (a copy only when needed)."""
    if t.shape[-1] != D:
        return F.pad(t, (0, D - t.shape[-1]))
    if not _aligned(t):
        t = t.contiguous()
        return t if _aligned(t) else t.clone()
    return t


def _output(t: torch.Tensor, D: int) -> torch.Tensor:
    """Where the kernel writes ``t``: t itself, or a padded / aligned scratch copied back by :func:`_finish`."""
    if t.shape[-1] == D and _aligned(t):
        return t
    return torch.empty((*t.shape[:-1], D), dtype=t.dtype, device=t.device)


def _finish(t: torch.Tensor, written: torch.Tensor) -> None:
    if written is not t:
        t.copy_(written[..., :t.shape[-1]])


def _check(q, k, v, bias, mask, kv_lens, varlen=None):
    if q.dtype == torch.float32:
        raise NotImplementedError("backend 'cuda': attention supports float16 and bfloat16, got torch.float32; "
                                  "use backend='triton' for float32")
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend 'cuda': attention supports float16 and bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_cuda(("q", q), ("k", k), ("v", v), ("bias", bias), ("mask", mask), ("kv_lens", kv_lens),
               *((("cu_seqlens_q", varlen[0]), ("cu_seqlens_k", varlen[1])) if varlen is not None else ()))
    # read as bytes and as a dense int32 [B]: anything else would be reinterpreted, not converted
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
    if kv_lens is not None and (kv_lens.dtype != torch.int32 or kv_lens.dim() != 1 or not kv_lens.is_contiguous()):
        raise TypeError(f"kv_lens must be a contiguous int32 tensor of shape (B,), got {kv_lens.dtype} "
                        f"{tuple(kv_lens.shape)} with strides {kv_lens.stride()}")


def _check_varlen(q, k, varlen):
    """Packed batch: q [total_q, H, D], k [total_k, Hkv, D], int32 contiguous cu_seqlens [B + 1] (read densely by
    the kernels) and max_seqlen ints. The values (rising from 0 to total) are checked by fastattn.attention."""
    if varlen is None:
        return
    cu_q, cu_k, max_q, max_k = varlen
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"a packed batch has q [total_q, H, D] and k/v [total_k, Hkv, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    for cu, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2 or not cu.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor of shape (B + 1,), got {cu.dtype} "
                             f"{tuple(cu.shape)} with strides {cu.stride()}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} must both have "
                         "B + 1 entries")
    for m, name in ((max_q, "max_seqlen_q"), (max_k, "max_seqlen_k")):
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < 2**31:
            raise ValueError(f"{name} must be an int in [0, 2**31), got {m!r}")


def _check_dropout(dropout):
    p, seed = dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {p!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"the dropout seed must lie in [0, 2**64), got {seed!r}")


def _shape(q, k, varlen):
    """(B, H, Lq, Lk): the grid's extents, max_seqlen_q/k for a packed batch (as the Triton launchers)."""
    if varlen is not None:
        return varlen[0].shape[0] - 1, q.shape[1], varlen[2], varlen[3]
    return q.shape[0], q.shape[1], q.shape[2], k.shape[2]


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen is not None else tuple(q.shape[:3])


def _check_f32(t: Optional[torch.Tensor], name: str, shape) -> None:
    """lse / dlse: fp32, contiguous, of the given shape (the kernels index them densely)."""
    if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != tuple(shape)):
        raise ValueError(f"{name} must be a contiguous float32 tensor of shape {tuple(shape)}, got {t.dtype} "
                         f"{tuple(t.shape)} with strides {t.stride()}")


def _check_dbias(dbias: Optional[torch.Tensor], full) -> None:
    """dbias: fp32, contiguous, shaped [B|1, H|1, Lq|1, Lk|1] for the grid's (B, H, Lq, Lk) = full."""
    if dbias is None:
        return
    if (dbias.dtype != torch.float32 or not dbias.is_contiguous() or dbias.dim() != 4
            or any(n not in (1, m) for n, m in zip(dbias.shape, full))):
        raise ValueError(f"dbias must be a contiguous float32 tensor of shape {tuple(full)} or with some of those "
                         f"dims 1 (a broadcast bias), got {dbias.dtype} {tuple(dbias.shape)} with strides "
                         f"{dbias.stride()}")


def _set(p, name: str, prefix: str, t: torch.Tensor, varlen=None) -> None:
    """p.<name> = t's data pointer, p.<prefix>_s{b,h,l} = its (batch, head, row) strides in elements: a packed
    [total, H, D] tensor has batch stride 0 (the kernels find a sequence's rows from cu_seqlens)."""
    setattr(p, name, t.data_ptr())
    for suffix, s in zip(("sb", "sh", "sl"), _rows(t, varlen)):
        setattr(p, f"{prefix}_{suffix}", s)


def _window_side(w: int, Lq: int, Lk: int) -> int:
    """One side of window_size for the kernels: −1 (unbounded) also for a side that reaches past every key
    (w >= Lq + Lk: the diagonal d(i) lies in [−Lq, Lq + Lk)), which changes nothing and keeps it an int32."""
    return -1 if w < 0 or w >= Lq + Lk else int(w)


def _params(q, k, v, bias, mask, kv_lens, scale, causal, bottom_right, dropout=(0.0, 0), varlen=None,
            window=(-1, -1), alibi=None, softcap=0.0):
    """AttnParams for the (padded) q, k, v, the optional bias (in q's dtype) / bool mask / kv_lens, dropout
    (p, seed), packed batch (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), window (left, right),
    ALiBi slopes (fp32 [H] or [1|B, H], checked by :func:`_check_local`) and soft cap."""
    C = extension(q)
    p = C.AttnParams()
    B, H, Lq, Lk = _shape(q, k, varlen)
    p.dtype = C.FLOAT16 if q.dtype == torch.float16 else C.BFLOAT16
    p.B, p.H, p.Hkv, p.Lq, p.Lk, p.D = B, H, k.shape[1], Lq, Lk, q.shape[-1]
    p.scale, p.causal, p.bottom_right = float(scale), bool(causal), bool(bottom_right)
    p.window_left, p.window_right = (_window_side(w, Lq, Lk) for w in window)  # causal: the kernels set right = 0
    p.softcap = float(softcap)
    if alibi is not None:
        p.alibi = alibi.data_ptr()
        p.alibi_sb = alibi.stride(0) if alibi.dim() == 2 and alibi.shape[0] > 1 else 0
    _set(p, "q", "q", q, varlen)
    _set(p, "k", "k", k, varlen)
    _set(p, "v", "v", v, varlen)
    p.dropout_p, p.seed = float(dropout[0]), int(dropout[1])
    if varlen is not None:
        p.cu_seqlens_q, p.cu_seqlens_k = varlen[0].data_ptr(), varlen[1].data_ptr()
        p.total_q, p.total_k = q.shape[0], k.shape[0]
    if bias is not None:
        p.bias = bias.data_ptr()
        p.bias_sb, p.bias_sh, p.bias_sm, p.bias_sn = _bcast_strides(bias)
    if mask is not None:
        p.mask = mask.data_ptr()
        p.mask_sb, p.mask_sh, p.mask_sm, p.mask_sn = _bcast_strides(mask)
    p.kv_lens = ptr(kv_lens)
    return p


def _bias(bias: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """The bias in q's dtype; the kernels read it an element at a time, so any view of it will do."""
    return None if bias is None else bias.to(q.dtype)


def _mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.view(torch.uint8)


def _check_local(q, k, window, alibi, softcap, count, varlen=None):
    """window_size (left, right) ints >= −1, alibi_slopes fp32 [H] or [1|B, H] (last dim contiguous) on q's
    device, softcap a finite float >= 0; block counting (a test hook of the Triton kernels) is refused."""
    if count is not None:
        raise NotImplementedError("block counting (count) is in the Triton kernels only: use backend='triton'")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), got {window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if alibi is not None:
        B, H = _shape(q, k, varlen)[:2]
        if not isinstance(alibi, torch.Tensor) or alibi.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be a float32 tensor, got {getattr(alibi, 'dtype', type(alibi))}")
        if tuple(alibi.shape) not in ((H,), (1, H), (B, H)) or alibi.stride(-1) != 1:
            raise ValueError(f"alibi_slopes must have shape (H,)=({H},) or (1|B, H)=(1|{B}, {H}) with a contiguous "
                             f"last dim, got {tuple(alibi.shape)} with strides {alibi.stride()}")
        check_cuda(("q", q), ("alibi_slopes", alibi))


def _check_origin(origin):
    """The Triton launchers' ``origin`` (a block of a larger problem: context parallelism's blocks) has no CUDA
    counterpart (context parallelism runs the Triton or torch blocks)."""
    if origin is not None:
        raise NotImplementedError("origin (a block at given positions of a larger problem) is not supported by the "
                                  "CUDA C++ kernels; use backend='triton'")


def forward(q, k, v, bias, mask, kv_lens, out, lse, scale, causal, bottom_right, window=(-1, -1), alibi=None,
            softcap=0.0, count=None, dropout=(0.0, 0), varlen=None, out_lo=None, origin=None):
    """Fill ``out`` like q and ``lse`` (fp32, contiguous, base 2: lse·log2(e)): q [B, H, Lq, D] and lse
    [B, H, Lq], or with ``varlen`` = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) packed q
    [total_q, H, D], k/v [total_k, Hkv, D] and lse [H, total_q]. ``dropout`` = (p, Philox seed). Last dims must be
    contiguous. ``window`` = (left, right), −1 unbounded; ``alibi``: fp32 [H] or [1|B, H]; ``softcap`` > 0 caps
    scores. ``out_lo`` (like ``out``) receives what rounding the output dropped, for :func:`backward`. The Triton
    module's signature (``count`` and ``origin`` are not supported)."""
    _check_origin(origin)
    _check(q, k, v, bias, mask, kv_lens, varlen)
    _check_local(q, k, window, alibi, softcap, count, varlen)
    _check_varlen(q, k, varlen)
    _check_dropout(dropout)
    _check_f32(lse, "lse", _lse_shape(q, varlen))
    C = extension(q)
    D = padded_head_dim(q.shape[-1], q)
    qp, kp, vp = _input(q, D), _input(k, D), _input(v, D)
    bias, mask = _bias(bias, q), _mask(mask)
    o = _output(out, D)
    o_lo = _lo_like(out_lo, out, o, copy=False)
    p = _params(qp, kp, vp, bias, mask, kv_lens, scale, causal, bottom_right, dropout, varlen, window, alibi, softcap)
    _set(p, "o", "o", o, varlen)
    p.o_lo = ptr(o_lo)
    p.lse = lse.data_ptr()
    if pack_gqa(q, k, alibi, dropout[0], bias, mask, varlen):
        p.pack_gqa = p.H // p.Hkv
    p.num_splits = _splits(q, p.B, p.H // p.pack_gqa, p.Lq * p.pack_gqa, p.Lk, p.D)  # the grid's heads and rows
    with device_ctx(q):
        nbytes = C.attention_fwd_workspace_bytes(p)  # the splits' fp32 partial outputs and LSEs
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
        p.workspace = ptr(workspace)
        C.attention_fwd(p, stream(q))
        _finish(out, o)
        if out_lo is not None:
            _finish(out_lo, o_lo)


def _lo_like(out_lo: Optional[torch.Tensor], out: torch.Tensor, o: torch.Tensor,
             copy: bool) -> Optional[torch.Tensor]:
    """The kernels index o_lo with o's strides (``o``: where they read or write ``out``): ``out_lo`` itself when
    it has them, else a copy laid out as o (``copy``: the backward) or scratch (the forward's, copied back by
    :func:`_finish`)."""
    if out_lo is None:
        return None
    if out_lo.dtype != out.dtype or out_lo.shape[:-1] != out.shape[:-1]:
        raise ValueError(f"out_lo must be like out ({out.dtype}, {tuple(out.shape)}), got {out_lo.dtype}, "
                         f"{tuple(out_lo.shape)}")
    if out_lo.shape == o.shape and out_lo.stride() == o.stride():
        return out_lo
    lo = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device)
    return lo.copy_(F.pad(out_lo, (0, o.shape[-1] - out_lo.shape[-1]))) if copy else lo


def _splits(q: torch.Tensor, B: int, H: int, Lq: int, Lk: int, D: int) -> int:
    """Key splits of a forward of grid (B, H, Lq, Lk) at (padded) head dim D: forced (``forced_splits``), else on
    a GPU the Triton backend's rule for this backend's (query block, key block) tile, else 1."""
    forced = forced_layout("splits")
    if forced is not None:
        return forced
    if not q.is_cuda:
        return 1
    block_m, block_n = extension(q).attention_fwd_tile(D)
    return num_splits(B * H * -(-Lq // block_m), -(-Lk // block_n), multiprocessors(q.device.index))


def pack_gqa(q, k, alibi, dropout_p, bias, mask, varlen) -> bool:
    """Whether the forward runs the ``group`` = H / Hkv query heads of a kv head as the rows of one CTA
    (AttnParams::pack_gqa: row r is query r / group of head hk·group + r % group), so that K/V are read once per
    group instead of once per query head: when the rows may differ by head (no ALiBi or dropout, a bias or mask
    broadcast over heads) and, unless ``forced_pack_gqa`` says, when that fills the forward's query blocks better
    (the Triton backend's rule, FlashAttention-3's, on this backend's query block: decoding and short queries
    pack). The backward is unchanged."""
    _, H, Lq, _ = _shape(q, k, varlen)
    group = H // k.shape[1]
    if (group == 1 or alibi is not None or dropout_p > 0.0
            or any(t is not None and t.shape[1] != 1 for t in (bias, mask))):
        return False
    forced = forced_layout("pack_gqa")
    if forced is not None:
        return forced
    block_m = extension(q).attention_fwd_tile(padded_head_dim(q.shape[-1], q))[0]
    return _pack_rule(group, Lq, block_m)


def backward(do, q, k, v, out, lse, dlse, bias, mask, kv_lens, dq, dk, dv, dbias, scale, causal, bottom_right,
             window=(-1, -1), alibi=None, softcap=0.0, count=None, dropout=(0.0, 0), varlen=None, delta_from_p=True,
             row_scale=None, out_lo=None, sink_weight=None, origin=None):
    """Fill dq, dk, dv (like q, k, v) and, when ``dbias`` is given, dbias (fp32, contiguous, shaped like the
    canonical bias, zero-initialised by the caller) with ds summed over the bias's broadcast dims. Layouts and
    options as :func:`forward`, with the same ``dropout`` seed (the backward regenerates the forward's mask).
    ``delta_from_p``, ``row_scale`` and ``sink_weight`` are the Triton backward's fp32 options; these fp16/bf16
    kernels take D_i = do_i·(o_i + o_lo_i) with the forward's ``out_lo``, do_i·o_i without."""
    _check_origin(origin)
    _check(q, k, v, bias, mask, kv_lens, varlen)
    _check_local(q, k, window, alibi, softcap, count, varlen)
    _check_varlen(q, k, varlen)
    _check_dropout(dropout)
    dlse = dlse.float().contiguous() if dlse is not None else None
    for t, name in ((lse, "lse"), (dlse, "dlse")):
        _check_f32(t, name, _lse_shape(q, varlen))
    full = _shape(q, k, varlen)
    _check_dbias(dbias, full)
    C = extension(q)
    D = padded_head_dim(q.shape[-1], q)
    qp, kp, vp, op, dop = (_input(t, D) for t in (q, k, v, out, do.to(q.dtype)))
    o_lo = _lo_like(out_lo, out, op, copy=True)
    bias, mask = _bias(bias, q), _mask(mask)
    dqp, dkp, dvp = _output(dq, D), _output(dk, D), _output(dv, D)
    p = _params(qp, kp, vp, bias, mask, kv_lens, scale, causal, bottom_right, dropout, varlen, window, alibi, softcap)
    _set(p, "o", "o", op, varlen)
    p.o_lo = ptr(o_lo)
    _set(p, "dout", "do", dop, varlen)
    _set(p, "dq", "dq", dqp, varlen)
    _set(p, "dk", "dk", dkp, varlen)
    _set(p, "dv", "dv", dvp, varlen)
    p.lse = lse.data_ptr()
    p.dlse = ptr(dlse)
    if dbias is not None:  # summed over its size-1 dims by the kernels (a broadcast bias's gradient)
        p.ds = dbias.data_ptr()
        p.ds_sb, p.ds_sh, p.ds_sm = dbias.stride()[:3]
        p.ds_reduce = sum(bit for bit, n, m in zip(C.DS_REDUCE, dbias.shape, full) if n == 1 < m)
    with device_ctx(q):
        nbytes = C.attention_bwd_workspace_bytes(p)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
        p.workspace = ptr(workspace)
        C.attention_bwd(p, stream(q))
        for t, written in ((dq, dqp), (dk, dkp), (dv, dvp)):
            _finish(t, written)


def dropout_keep_scale(dropout_p: float) -> float:
    """1 − p as the kernels form it from AttnParams::dropout_p (an fp32 p): 1.f − p in fp32 (their normaliser
    l·(1 − p)); through 1 / it, the r·v of fastattn.ops.attention._dp_values."""
    p32 = torch.tensor(float(dropout_p), dtype=torch.float32)
    return float(torch.ones((), dtype=torch.float32) - p32)


def dropout_mask(B, H, Lq, Lk, dropout_p, seed, device):
    """The bool keep-mask [B, H, Lq, Lk] the CUDA kernels apply for (dropout_p, seed), drawn by their own Philox
    (csrc/attention/philox.h), which is the Triton kernels' bit for bit (tests/test_cuda_philox.py)."""
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.uint8, device=device)
    with device_ctx(keep):
        extension(keep).attention_dropout_mask(ptr(keep), keep.numel(), float(dropout_p), int(seed), stream(keep))
    return keep.view(torch.bool)
