"""Context parallelism: attention over a sequence sharded across the ranks of a ``torch.distributed`` group.

Each of the N ranks holds a shard of the sequence (:func:`shard`): its queries, keys and values at the same global
positions. :func:`context_parallel_attention` is ring attention. The K/V shards travel around the ring (rank r
sends to r + 1 and receives from r − 1, point to point, overlapped with the attention of the shard in hand), so
after N steps (with a window, maybe fewer: see below) every query has seen every key it may. Step t gives a
partial output o_t, normalised over the keys seen, and its log-sum-exp (base 2, as the kernels keep it) lse_t;
the partials are merged in fp32 (float64 for float32 and float64 inputs, whose output is then rounded once; the
LSEs in float64), nothing rounded between steps:

    lse = log2 Σ_t 2^lse_t,   o = Σ_t 2^(lse_t − lse) · o_t.

Learnable sinks (``sinks``, one logit per head) join the merged result as in fastattn.attention: o and lse are
rescaled once after the last merge, and the backward, given those, is the sink-aware one.

The backward takes the global o and lse that the forward saved, D_i = do_i·o_i, and on each step's keys
p_ij = 2^(s_ij·log2(e) − lse_i):  dv_j += Σ_i p_ij do_i,  ds_ij = p_ij (do_i·v_j − D_i),
dq_i += scale Σ_j ds_ij k_j,  dk_j += scale Σ_i ds_ij q_i. dK/dV (fp32) travel around the ring with their K/V and
come home: after N hops, or with a window that stops the ring at step T, T hops and one straight home.

Layouts cut the sequence into the chunks of ``torch.tensor_split`` (sizes differ by at most one: any length
works). "zigzag": 2N chunks, rank r holds chunks r and 2N−1−r (every rank gets the same causal work);
"contiguous": N chunks, rank r holds chunk r.

Causal attention is top-left in global positions (query i sees keys j <= i); ``window_size`` (left, right) keeps
i − left <= j <= i + right (causal: right = 0), as fastattn.attention's. Between a query chunk and a key chunk a
block is "full" (every pair visible), "skip" (none) or banded: the rows and keys the window reaches, the window
taken in positions (``_band``; the kernels shift their diagonal by the block's i0 − j0). Without a window only a
rank's own shard has banded (causal-diagonal) blocks; with one, the ring stops after the last step whose shard some
window reaches, and dK/dV go straight home. A window reaching right also gets the shards after a rank's own from
a second ring that runs backward (rank r sends to r − 1), where that takes fewer messages (``_ring_steps``: a
window reaching one shard both ways over contiguous shards, one step each way from N = 4 on). Packed documents
(cu_seqlens) cut each block to the documents both sides hold, in blocks of whole documents, with a same-document
mask (of at most _DOC_MASK_ELEMS pairs) where one spans several; key padding gives each block its count (kv_lens)
or its slice of the whole sequence's mask (key_padding_mask, all-gathered once per call).
ALiBi, dropout, documents and padding need each block's positions: their blocks cover one chunk pair each, and the
kernels take the block's origin (its first row's and key's positions), so the slopes' distances and the dropout
mask's Philox counters are the whole sequence's (the mask equals one process's for the same seed).

``strategy="ulysses"`` (DeepSpeed-Ulysses) splits heads instead: all-to-alls give each rank the whole sequence of
H/N heads, one fastattn.attention call computes them, and an all-to-all returns the output (:func:`_ulysses`).
"""
from __future__ import annotations

import bisect
import functools
import math
import struct
import zlib
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch import Tensor

from . import dispatch, masks
from .ops.attention import _apply_sinks, _check_features, _dp_values, _sink_row_grad, check_kv_lens, check_sinks
from .ops.common import check_kernel_dtype, check_same, check_tensor, empty, kernels_take, lastdim_contiguous

__all__ = ["shard", "unshard", "context_parallel_attention", "shard_lengths", "comm_stats"]

LAYOUTS = ("zigzag", "contiguous")
STRATEGIES = ("ring", "ulysses")
_BACKENDS = ("torch", "triton", "cuda")  # the resolved backend, compared across ranks
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_MAX_DIMS = 8  # dims of a tensor whose shape unshard can gather
# The largest same-document mask of a block (rows × keys, bool): documents that would need more are cut into
# blocks of their own (4 MB; the kernels skip the tiles a mask hides, so a smaller one would only add launches).
_DOC_MASK_ELEMS = 1 << 22
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}  # exchanged between ranks; len(_DTYPES): any other

# Traffic of this process (the ring's point-to-point messages, Ulysses' all-to-all pieces to other ranks): what
# the benchmark compares with its model.
_SENT = {"bytes": 0, "messages": 0}


def comm_stats(reset: bool = False) -> dict:
    """{"bytes", "messages"} this process has sent to other ranks so far: the ring's point-to-point operations and
    Ulysses' all-to-all pieces (padded to the longest shard)."""
    out = dict(_SENT)
    if reset:
        _SENT.update(bytes=0, messages=0)
    return out


# --------------------------------------------------------------------------------------------- geometry
def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastattn.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the group passed to fastattn.distributed")
    return rank, dist.get_world_size(group)


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(L: int, n: int) -> list[tuple[int, int]]:
    """(start, length) of the n chunks of ``torch.tensor_split(x, n)`` of a length-L dim: the first L mod n hold
    one more element."""
    base, extra = divmod(L, n)
    out, start = [], 0
    for c in range(n):
        length = base + (c < extra)
        out.append((start, length))
        start += length
    return out


def _chunk_ids(rank: int, N: int, layout: str) -> list[int]:
    return [rank, 2 * N - 1 - rank] if layout == "zigzag" else [rank]


def _rank_chunks(L: int, N: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """(start, length) of rank's chunks in its local order (increasing global position)."""
    chunks = _chunks(L, 2 * N if layout == "zigzag" else N)
    return [chunks[c] for c in _chunk_ids(rank, N, layout)]


def shard_lengths(L: int, N: int, layout: str = "zigzag") -> list[int]:
    """Local length of each of N ranks' shards of a length-L sequence."""
    _check_layout(layout)
    return [sum(n for _, n in _rank_chunks(L, N, r, layout)) for r in range(N)]


def _dim(x: Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of {x.dim()} dims")
    return dim % x.dim()


def shard(x: Tensor, group=None, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's part of the full sequence ``x`` along ``dim``: with c = ``torch.tensor_split(x, 2N, dim)``,
    ``cat(c[r], c[2N−1−r])`` ("zigzag"), or ``tensor_split(x, N, dim)[r]`` ("contiguous"). Differentiable."""
    _check_layout(layout)
    rank, N = _group_info(group)
    dim = _dim(x, dim)
    return torch.cat([x.narrow(dim, s, n) for s, n in _rank_chunks(x.shape[dim], N, rank, layout)], dim)


def _comm_device(group, t: Tensor) -> torch.device:
    """Where the group's backend reads tensors: NCCL needs them on t's GPU; gloo gets CPU copies (so several
    processes can share one GPU over gloo: the transfers are staged through host memory)."""
    backend = str(dist.get_backend(group))
    if not isinstance(t, Tensor):  # a rank whose arguments failed their checks still joins the exchange
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    if ":" in backend:  # a per-device mapping such as "cpu:gloo,cuda:nccl": each tensor goes to its own device
        return t.device
    if backend == "nccl":
        if not t.is_cuda:
            raise ValueError(f"the group's backend is NCCL, which needs CUDA tensors; got tensors on {t.device}")
        return t.device
    return torch.device("cpu")


def _all_gather_ints(values: list[int], group, N: int, device) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(N)]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def _gather_checked(meta: list[int], error: Optional[Exception], group, N: int, device, what: str):
    """Every rank's ``meta`` (+ whether that rank's own argument checks failed, ``error``): every rank joins the
    exchange, then each raises if any failed (its own error, or which ranks failed), so none waits forever on a
    rank that raised alone. -> the metas."""
    metas = _all_gather_ints(meta + [int(error is not None)], group, N, device)
    if error is not None:
        raise error
    failed = [r for r, m in enumerate(metas) if m[-1]]
    if failed:
        raise RuntimeError(f"{what}: the arguments on rank(s) {failed} failed their checks (their error says why)")
    return [m[:-1] for m in metas]


def _check_lengths(lengths: list[int], N: int, layout: str, what: str) -> int:
    """L = Σ lengths, after checking that they are the shard lengths of a length-L sequence in ``layout``."""
    L = sum(lengths)
    expected = shard_lengths(L, N, layout)
    if lengths != expected:
        raise ValueError(f"{what}: the shard lengths across the group's ranks are {lengths}, but fastattn.distributed"
                         f".shard of a length-{L} sequence over {N} ranks with layout={layout!r} gives {expected}: "
                         "the tensors were not sharded with this group and layout")
    return L


def unshard(x_local: Tensor, group=None, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """The full sequence from every rank's shard (the inverse of :func:`shard`), on every rank. The shard lengths
    come from the group (an all-gather of the shapes), so uneven lengths need no argument. Not differentiable."""
    rank, N = _group_info(group)
    device = _comm_device(group, x_local)
    error = None
    try:
        _check_layout(layout)
        dim = _dim(x_local, dim)
        if x_local.dim() > _MAX_DIMS:
            raise ValueError(f"unshard takes tensors of at most {_MAX_DIMS} dims, got {x_local.dim()}")
    except (TypeError, ValueError) as e:
        error, dim, layout = e, 0, LAYOUTS[0]
    # every rank's dtype, dim and layout too: a rank that differs would otherwise abort in all_gather (sizes) or
    # get a wrongly assembled tensor
    extra = [_DTYPE_CODE.get(x_local.dtype, len(_DTYPES)), dim, LAYOUTS.index(layout)]
    meta = ([x_local.dim(), *x_local.shape] + [-1] * (_MAX_DIMS - x_local.dim()))[:_MAX_DIMS + 1] + extra
    shapes = _gather_checked(meta, error, group, N, device, "unshard")
    for what, i in (("dtypes", -3), ("dims", -2), ("layouts", -1)):
        values = [m[i] for m in shapes]
        if len(set(values)) != 1:
            shown = [_dtype_name(c) for c in values] if what == "dtypes" else [LAYOUTS[c] for c in values] \
                if what == "layouts" else values
            raise ValueError(f"unshard: the ranks pass different {what}: {shown} (ranks 0..{N - 1})")
    mine = meta[: 1 + x_local.dim()]
    for r, s in enumerate(shapes):
        other = s[: 1 + s[0]]
        if len(other) != len(mine) or any(a != b for i, (a, b) in enumerate(zip(mine[1:], other[1:])) if i != dim):
            raise ValueError(f"unshard: rank {r} holds a shard of shape {tuple(other[1:])} and rank {rank} one of "
                             f"{tuple(mine[1:])}: they must agree in every dim but dim {dim}")
    lengths = [s[1 + dim] for s in shapes]
    _check_lengths(lengths, N, layout, "unshard")
    return _gather_shards(x_local.detach(), lengths, dim, layout, group, device)


def _gather_shards(x_local: Tensor, lengths: list[int], dim: int, layout: str, group, device) -> Tensor:
    """The whole sequence from every rank's shard of it along ``dim``, the ranks' shard ``lengths`` known (every
    rank must call it, with the same lengths)."""
    N = len(lengths)
    # all_gather moves equal shapes: pad every shard to the longest, cut the padding off afterwards.
    longest = max(lengths)
    x = x_local.to(device)
    if x.shape[dim] < longest:
        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    gathered = [torch.empty_like(x) for _ in range(N)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    L = sum(lengths)
    parts = [None] * (2 * N if layout == "zigzag" else N)
    for r, t in enumerate(gathered):
        offset = 0
        for c, (_, n) in zip(_chunk_ids(r, N, layout), _rank_chunks(L, N, r, layout)):
            parts[c] = t.narrow(dim, offset, n)
            offset += n
    return torch.cat(parts, dim).to(x_local.device)


# --------------------------------------------------------------------------------------------- ring steps
def _band(qs: int, ql: int, ks: int, kl: int, left: int, right: int):
    """The part of the block (query chunk (qs, ql), key chunk (ks, kl)) that the global window
    ``j − i ∈ [−left, right]`` (positions; −1: unbounded) lets through: (rows [ra, rb), keys [ka, kb) of the
    chunks, (wl, wr)), or None where it lets nothing through. The rows and keys are trimmed to those that see
    or are seen; (wl, wr) is the global window with −1 for a bound no pair of the trimmed block reaches."""
    if ql == 0 or kl == 0:
        return None
    d = qs - ks  # in chunk-local indices: j − i (positions) = j − i (indices) − d
    lo = d - left if left >= 0 else -math.inf  # index j − i >= lo
    hi = d + right if right >= 0 else math.inf  # index j − i <= hi
    ra, rb = max(0, -hi), min(ql, kl - lo)  # rows that see a key: i + hi >= 0 and i + lo <= kl − 1
    if ra >= rb:
        return None
    ra, rb = int(ra), int(rb)
    ka, kb = int(max(0, lo + ra)), int(min(kl, hi + rb))  # keys those rows see
    wl = -1 if lo == -math.inf or ka - lo >= rb - 1 else left  # the smallest j − i, (ka) − (rb − 1), is allowed
    wr = -1 if hi == math.inf or kb - 1 - ra <= hi else right  # the largest, (kb − 1) − ra, is allowed
    return ra, rb, ka, kb, wl, wr


def _doc_split(i0: int, i1: int, j0: int, j1: int, docs: list[int], mask_elems: int):
    """Rows [i0, i1) and keys [j0, j1) (positions) cut into blocks of the documents (``docs``: boundaries,
    cu_seqlens) that both sides hold: a list of (i0, i1, j0, j1, doc_mask). Consecutive documents share a block,
    which then needs the same-document mask (doc_mask True), while its rows × keys stay within ``mask_elems``; a
    larger document is a block of its own, without a mask: no block's mask is quadratic in the shard's length."""
    doc = lambda pos: bisect.bisect_right(docs, pos) - 1  # noqa: E731
    blocks = []
    for d in range(max(doc(i0), doc(j0)), min(doc(i1 - 1), doc(j1 - 1)) + 1):
        a, b, c, e = max(i0, docs[d]), min(i1, docs[d + 1]), max(j0, docs[d]), min(j1, docs[d + 1])
        if a >= b or c >= e:  # an empty document
            continue
        if blocks and (b - blocks[-1][0]) * (e - blocks[-1][2]) <= mask_elems:
            blocks[-1] = (blocks[-1][0], b, blocks[-1][2], e, True)
        else:
            blocks.append((a, b, c, e, False))
    return blocks


def _plan(q_chunks, k_chunks, left: int, right: int, merge: bool = True, docs: Optional[list[int]] = None,
          mask_elems: Optional[int] = None):
    """The attention blocks of one ring step for a rank holding queries at ``q_chunks`` and keys at ``k_chunks``
    ((global start, length), increasing) under the global window (left, right) (causal: right = 0): a list of
    (q_lo, q_hi, k_lo, k_hi, wl, wr, i0, j0, doc_mask) in local offsets, the block's rows being positions i0,
    i0 + 1, ... and its keys j0, j0 + 1, ..., (wl, wr) the window in positions (−1: unbounded) and doc_mask whether
    it spans several of the documents ``docs`` (boundaries; None: one document; blocks of whole documents, a
    mask of at most ``mask_elems`` pairs, default _DOC_MASK_ELEMS: :func:`_doc_split`). With ``merge`` (not with docs),
    runs of chunks that one call covers merge into one block (i0 = j0 = None: not consecutive positions, window
    (−1, −1) or causal (−1, 0), which need only the order): what ALiBi and dropout, which need positions, must not
    get."""
    Lq, Lk = sum(n for _, n in q_chunks), sum(n for _, n in k_chunks)
    if Lq == 0 or Lk == 0:
        return []
    merge = merge and docs is None
    if merge and left < 0 and right < 0:
        return [(0, Lq, 0, Lk, -1, -1, None, None, False)]
    if merge and left < 0 and right == 0 and q_chunks == k_chunks:
        # The same positions in the same increasing order: local index order is global order, so one top-left
        # causal call covers the diagonal blocks, the full block of the later chunk on the earlier one and the
        # skipped block (the kernels do not visit key blocks past the diagonal).
        return [(0, Lq, 0, Lk, -1, 0, None, None, False)]
    blocks, q_off = [], 0
    for qs, ql in q_chunks:
        full, k_off = [], 0  # the key ranges every query of this chunk sees entirely, merged where adjacent
        for ks, kl in k_chunks:
            band = _band(qs, ql, ks, kl, left, right)
            if band is not None:
                ra, rb, ka, kb, wl, wr = band
                if merge and (ra, rb, ka, kb, wl, wr) == (0, ql, 0, kl, -1, -1):
                    if full and full[-1][1] == k_off:
                        full[-1] = (full[-1][0], k_off + kl)
                    else:
                        full.append((k_off, k_off + kl))
                else:  # in positions: rows i0 .. i1, keys j0 .. j1
                    cuts = [(qs + ra, qs + rb, ks + ka, ks + kb, False)] if docs is None else _doc_split(
                        qs + ra, qs + rb, ks + ka, ks + kb, docs, _DOC_MASK_ELEMS if mask_elems is None else mask_elems)
                    for i0, i1, j0, j1, doc_mask in cuts:
                        blocks.append((q_off + i0 - qs, q_off + i1 - qs, k_off + j0 - ks, k_off + j1 - ks, wl, wr,
                                       i0, j0, doc_mask))
            k_off += kl
        for lo, hi in full:  # a run of query chunks seeing the same keys is one call
            if blocks and blocks[-1][1] == q_off and blocks[-1][2:6] == (lo, hi, -1, -1):
                blocks[-1] = (blocks[-1][0], q_off + ql, lo, hi, -1, -1, None, None, False)
            else:
                blocks.append((q_off, q_off + ql, lo, hi, -1, -1, None, None, False))
        q_off += ql
    return blocks


def _needed_offsets(chunks, window: tuple[int, int], docs: Optional[list[int]] = None) -> set[int]:
    """The d in 1 .. N − 1 for which some rank r's queries see keys of shard r + d, i.e. _plan gives a block: some
    chunk pair's band (_band) is not empty and, with documents, its rows and keys share one. For every (rank,
    shard, chunk pair) at once (tensor ops: no N² Python loop)."""
    N, C = len(chunks), max(len(c) for c in chunks)
    padded = [list(cs) + [(0, 0)] * (C - len(cs)) for cs in chunks]  # (start, length) [N, C, 2]
    start, length = torch.tensor(padded, dtype=torch.int64).unbind(2)
    big = 4 * (int((start + length).max()) + 1)  # "unbounded": past every position
    qs, ql, ks, kl = start.view(N, 1, C, 1), length.view(N, 1, C, 1), start.view(1, N, 1, C), length.view(1, N, 1, C)
    d = qs - ks  # as _band: index j − i >= lo and <= hi
    lo = d - window[0] if window[0] >= 0 else torch.full_like(d, -big)
    hi = d + window[1] if window[1] >= 0 else torch.full_like(d, big)
    ra, rb = (-hi).clamp(min=0), torch.minimum(ql, kl - lo)
    seen = (ra < rb) & (ql > 0) & (kl > 0)
    if docs is not None:  # the band's rows and keys hold a common document (_doc_split then gives a block)
        ka, kb = (lo + ra).clamp(min=0), torch.minimum(kl, hi + rb)
        bounds = torch.tensor(docs, dtype=torch.int64)
        doc = lambda pos: torch.searchsorted(bounds, pos, right=True) - 1  # noqa: E731
        seen &= torch.maximum(doc(qs + ra), doc(ks + ka)) <= torch.minimum(doc(qs + rb - 1), doc(ks + kb - 1))
    r, src = seen.any(3).any(2).nonzero(as_tuple=True)
    return set(((src - r) % N).tolist()) - {0}


def _ring_steps(chunks, window: tuple[int, int], docs: Optional[list[int]] = None) -> tuple[int, int]:
    """(TL, TR): rank r gets shard r − t at steps t = 0 .. TL (the K/V passed forward, to r + 1) and shard r + t at
    steps t = 1 .. TR (passed backward, to r − 1), TL + TR <= N − 1 so that no shard comes twice, covering every
    shard whose keys some window lets rank r's queries see (every rank knows every shard's chunks: all agree). Of
    those pairs, the one with the fewest messages, the forward ring alone on a tie: (N − 1, 0) without a window,
    (T, 0) for a causal one that reaches T shards back, (1, 1) for a window reaching one shard both ways (N >= 4).
    Cached: a training loop asks the same question every layer."""
    return _ring_steps_of(tuple(tuple(c) for c in chunks), tuple(window), None if docs is None else tuple(docs))


@functools.lru_cache(maxsize=64)
def _ring_steps_of(chunks, window, docs) -> tuple[int, int]:
    N = len(chunks)
    needed = _needed_offsets(chunks, window, docs)
    below = [0] * (N + 1)  # below[k]: the largest needed d < k (0: none)
    for k in range(1, N + 1):
        below[k] = k - 1 if k - 1 in needed else below[k - 1]
    # shard r + d comes at forward step N − d (d >= N − TL) or at backward step d (d <= TR)
    return min(((TL, below[N - TL]) for TL in range(N)), key=lambda p: (p[0] + p[1], p[1]))


class _Pending:
    def __init__(self, works, recv: Tensor, device, keep):
        self.works, self.recv, self.device, self.keep = works, recv, device, keep

    def wait(self) -> Tensor:
        for w in self.works:
            w.wait()
        self.keep = None  # the send buffer may be freed now
        return self.recv.to(self.device)


class _Ring:
    """Point-to-point exchange along the ring: send to rank + hop, receive from rank − hop (group ranks)."""

    def __init__(self, group, rank: int, size: int, comm_device):
        self.group, self.rank, self.size, self.comm_device = group, rank, size, comm_device

    def exchange(self, send: Tensor, recv_shape, dtype, tag: int, hop: int = 1) -> _Pending:
        """Start sending ``send`` and receiving a tensor of ``recv_shape``; ``.wait()`` returns the received one."""
        to, frm = (self.rank + hop) % self.size, (self.rank - hop) % self.size
        send_c = send.to(self.comm_device)
        recv = torch.empty(recv_shape, dtype=dtype, device=self.comm_device)
        ops = []
        # Both ends know every shard's length, so both skip an empty message.
        if send_c.numel():
            ops.append(dist.P2POp(dist.isend, send_c, group=self.group, group_peer=to, tag=tag))
            _SENT["bytes"] += send_c.numel() * send_c.element_size()
            _SENT["messages"] += 1
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, group=self.group, group_peer=frm, tag=tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(works, recv, send.device, send_c)


# --------------------------------------------------------------------------------------------- block kernels
class _Features(NamedTuple):
    """What every block of one call shares: softcap (0: off), ALiBi slopes (fp32 [1|B, H] or None), dropout
    (p, Philox seed; p = 0: off), the sequence length L (positions 0 .. L − 1, the dropout counters'), and the
    documents: boundaries ``docs`` (cu_seqlens, or None) and each position's document ``doc_of`` (int32 [L])."""
    softcap: float
    alibi: Optional[Tensor]
    dropout_p: float
    seed: int
    L: int
    docs: Optional[list[int]] = None
    doc_of: Optional[Tensor] = None
    kv_lens: Optional[Tensor] = None  # int32 [B]: keys at positions >= kv_lens[b] are padding
    key_pad: Optional[Tensor] = None  # bool [B, L]: True where the key at that position is padding


def _block_kv_lens(blk, lk: int, feat: _Features) -> Optional[Tensor]:
    """int32 [B]: how many of a block's lk keys (from position j0) lie before kv_lens[b]; None without kv_lens."""
    if feat.kv_lens is None:
        return None
    return (feat.kv_lens - blk[3]).clamp(0, lk).to(torch.int32).contiguous()


def _block_key_pad(blk, lk: int, feat: _Features) -> Optional[Tensor]:
    """Bool [B, lk]: True where a block's key (from position j0) is padding; None without key_padding_mask."""
    return None if feat.key_pad is None else feat.key_pad[:, blk[3]:blk[3] + lk]


def _kernel_mask(blk, lq: int, lk: int, feat: _Features) -> Optional[Tensor]:
    """The kernels' bool mask of a block (True = attend), [1|B, 1, 1|lq, lk]: same document and not padding."""
    same_doc, pad = _doc_mask(blk, lq, lk, feat), _block_key_pad(blk, lk, feat)
    if pad is None:
        return None if same_doc is None else same_doc[None, None]
    keep = ~pad[:, None, None, :]
    return keep if same_doc is None else keep & same_doc


def _doc_mask(blk, lq: int, lk: int, feat: _Features) -> Optional[Tensor]:
    """Bool [lq, lk]: True where row and key of the block lie in the same document; None where it needs none."""
    _, _, i0, j0, doc_mask = blk
    if not doc_mask:
        return None
    return feat.doc_of[i0:i0 + lq, None] == feat.doc_of[None, j0:j0 + lk]


def _shift(i0: Optional[int], j0: Optional[int]) -> int:
    """Index j − i minus position j − i in a block whose rows start at position i0 and keys at j0: the kernels'
    diagonal shift (0 for a merged block, whose windows need only the order)."""
    return 0 if i0 is None else i0 - j0


def _torch_scores(q, k, scale, blk, feat: _Features):
    """(s, t, keep) of a block: scores s = scale·q·kᵀ, capped (t = tanh(s/c), else None), minus ALiBi's
    slope·|i − j| in positions, −inf where the window hides the pair; keep: the dropout keep-mask of these
    positions (the kernels' Philox), or None. q grouped [B, Hkv, G, Lq, D], k [B, Hkv, 1, Lk, D]."""
    wl, wr, i0, j0, _ = blk
    B, Hkv, G, Lq = q.shape[:4]
    Lk = k.shape[3]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    t = None
    if feat.softcap > 0.0:
        t = torch.tanh(s / feat.softcap)
        s = feat.softcap * t
    rel = torch.arange(Lk, device=q.device)[None, :] - torch.arange(Lq, device=q.device)[:, None] - _shift(i0, j0)
    if feat.alibi is not None:  # slopes [1|B, H] -> [1|B, Hkv, G, 1, 1]
        slopes = feat.alibi.to(s.dtype).reshape(-1, Hkv, G, 1, 1)
        s = s - slopes * rel.abs().to(s.dtype)
    hide = None
    if wr >= 0:
        hide = rel > wr
    if wl >= 0:
        hide = rel < -wl if hide is None else hide | (rel < -wl)
    same_doc = _doc_mask(blk, Lq, Lk, feat)
    if same_doc is not None:
        hide = ~same_doc if hide is None else hide | ~same_doc
    kv = _block_kv_lens(blk, Lk, feat)
    if kv is not None:  # [B, 1, 1, 1, Lk]: the padding keys of each batch entry
        pad = torch.arange(Lk, device=q.device) >= kv.view(B, 1, 1, 1, 1)
        hide = pad if hide is None else hide | pad
    key_pad = _block_key_pad(blk, Lk, feat)
    if key_pad is not None:  # [B, 1, 1, 1, Lk]
        pad = key_pad.view(B, 1, 1, 1, Lk)
        hide = pad if hide is None else hide | pad
    if hide is not None:
        s = s.masked_fill(hide, float("-inf"))
    keep = None
    if feat.dropout_p > 0.0:  # counter ((b·H + h)·L + i)·L + j in positions, as fastattn.attention's kernels
        bh = torch.arange(B * Hkv * G, device=q.device, dtype=torch.int64).view(B, Hkv, G, 1, 1)
        i = (i0 + torch.arange(Lq, device=q.device, dtype=torch.int64)).view(Lq, 1)
        j = (j0 + torch.arange(Lk, device=q.device, dtype=torch.int64)).view(1, Lk)
        keep = masks.dropout_keep(feat.seed, feat.dropout_p, (bh * feat.L + i) * feat.L + j)
    return s, t, keep


def _keep_scale(feat: _Features) -> float:
    from .triton.attention import dropout_keep_scale
    return dropout_keep_scale(feat.dropout_p)


def _torch_block_forward(q, k, v, scale, blk, feat: _Features, acc):
    """(o in dtype ``acc``, lse2 in fp64): o = dropout(softmax(s))·v over this block's keys, lse2 = log2 Σ_j
    e^(s_ij) (before dropout), s as :func:`_torch_scores` forms it. −inf lse2, o = 0 for a row without keys. GQA:
    query head h reads kv head h // (H/Hkv). The scores stay natural (rounding s·log2(e) errs by |s|·2⁻²⁴ in each
    exponent, which at large scores missed the §5 rule in fp32)."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    qg = q.to(acc).reshape(B, Hkv, H // Hkv, Lq, D)
    s, _, keep = _torch_scores(qg, k.to(acc).unsqueeze(2), scale, blk, feat)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row without keys: e^(−inf − 0) = 0, not NaN
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    lse2 = ((m.double() + torch.log(l.double())) * LOG2E).squeeze(-1)
    if keep is not None:  # the kernels' normaliser l·(1 − p)
        p, l = p.masked_fill(~keep, 0.0), l * _keep_scale(feat)
    o = torch.matmul(p, v.to(acc).unsqueeze(2)) / torch.where(l == 0, 1.0, l)
    return o.reshape(B, H, Lq, v.shape[3]), lse2.reshape(B, H, Lq)


def _torch_block_backward(do, q, k, v, out, out_lo, lse2, dlse2, scale, blk, feat: _Features, acc):
    """(dq, dk, dv) in ``acc`` of this block's keys, from the global output (fp16/bf16: plus ``out_lo``, what
    rounding it dropped), lse2 (+inf: empty row) and its gradient dlse2 (or None) of these query rows, with
    D_i = do_i·o_i − dLSE_i."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    Dv = v.shape[3]
    qg, dog = q.to(acc).reshape(B, Hkv, G, Lq, D), do.to(acc).reshape(B, Hkv, G, Lq, Dv)
    kk, vv = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    # D_i through the same matmul reduction as dp_ij = do_i·v_j (as the Triton delta kernel does): a row that sees
    # one key has o_i = v_j bitwise, and then dp − D cancels exactly (its gradient is exactly 0, as the reference's).
    og = (out.to(acc) if out_lo is None else out.to(acc) + out_lo.to(acc)).reshape(B, Hkv, G, Lq, Dv)
    delta = torch.matmul(dog, og.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    if dlse2 is not None:  # ∂LSE_i/∂s_ij = p_ij: dLSE joins ds_ij = p_ij (dp_ij − D_i + dLSE_i) through D_i
        delta = delta - (dlse2.to(acc) * LOG2E).reshape(B, Hkv, G, Lq, 1)
    s, t, keep = _torch_scores(qg, kk, scale, blk, feat)
    # p = e^(s − lse) with the global LSE in fp64 (lse2, base 2, from the merges): no rounding of it in p
    p = torch.exp(s.double() - lse2.double().reshape(B, Hkv, G, Lq, 1) / LOG2E).to(acc)
    dp = torch.matmul(dog, vv.transpose(-1, -2))
    p_out = p
    if keep is not None:  # o used keep·p/(1 − p): so do dv and dp
        r = 1.0 / _keep_scale(feat)
        p_out, dp = (p * r).masked_fill(~keep, 0.0), (dp * r).masked_fill(~keep, 0.0)
    dv = torch.matmul(p_out.transpose(-1, -2), dog).sum(2)
    ds = p * (dp - delta)
    if t is not None:  # d(c·tanh(s/c))/ds = 1 − tanh²
        ds = ds * (1.0 - t * t)
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale
    return dq.reshape(B, H, Lq, D), dk, dv


def _kernel_features(blk, feat: _Features) -> dict:
    """The Triton launchers' keywords for a block: its window and, for a block at known positions, its origin
    (the windows, diagonal, ALiBi and dropout counters then in positions)."""
    wl, wr, i0, j0, _ = blk
    return dict(window=(wl, wr), softcap=feat.softcap, alibi=feat.alibi,
                dropout=(feat.dropout_p, feat.seed) if feat.dropout_p > 0.0 else (0.0, 0),
                origin=None if i0 is None else (i0, j0, feat.L, feat.L))


def _triton_block_forward(q, k, v, scale, blk, feat: _Features, acc):
    """As :func:`_torch_block_forward`, by the Triton kernel writing an fp32 (un-rounded) output."""
    from .triton import attention as kernels
    if q.numel() == 0:  # an empty batch or head set: nothing to launch (as attention() returns at once)
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float64)
    out = empty(q.shape, like=q, dtype=torch.float32)
    lse2 = empty(q.shape[:3], like=q, dtype=torch.float64)  # fp32 inputs: the kernel's fp64 LSE, unrounded
    kernels.forward(q, k, v, None, _kernel_mask(blk, q.shape[2], k.shape[2], feat),
                    _block_kv_lens(blk, k.shape[2], feat), out, lse2, scale, False, False,
                    **_kernel_features(blk, feat))
    return out, torch.where(lse2 == float("inf"), float("-inf"), lse2)  # the kernel marks empty rows +inf


def _triton_block_backward(do, q, k, v, out, out_lo, lse2, dlse2, scale, blk, feat: _Features):
    """(dq, dk, dv) in fp32 by the Triton kernels, given the global output (and ``out_lo``), lse2 and its gradient
    dlse2 (or None) of these query rows."""
    from .triton import attention as kernels
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch: no row, or no key of this block
        return (q.new_zeros(q.shape, dtype=torch.float32), k.new_zeros(k.shape, dtype=torch.float32),
                v.new_zeros(v.shape, dtype=torch.float32))
    dq = empty(q.shape, like=q, dtype=torch.float32)
    dk = empty(k.shape, like=k, dtype=torch.float32)
    dv = empty(v.shape, like=v, dtype=torch.float32)
    # D_i from the global out: these keys are a part of the row's (the kernels' fp32 D from their own p would not be)
    # lse2 (+inf for an empty row): fp64 for fp32 inputs, as the op saves it, with the row scale c = e^(r − lse)
    # that makes the kernel's weights c·e^(s − r), r = fl32(lse2·ln 2) as it forms it (_row_stats), exact
    lse2 = lse2.contiguous()
    row_scale = None
    if q.dtype == torch.float32:
        r = (lse2.double() * math.log(2.0)).float()
        row_scale = torch.where(torch.isinf(lse2), 1.0, torch.exp(r.double() - lse2 / LOG2E)).float().contiguous()
        if feat.dropout_p > 0.0:  # fp32 with dropout: V holds r·v (as fastattn.attention's backward passes it)
            v = _dp_values(v, feat.dropout_p, "triton")
    dlse2 = None if dlse2 is None else dlse2.contiguous()
    kernels.backward(do, q, k, v, out, lse2, dlse2, None, _kernel_mask(blk, q.shape[2], k.shape[2], feat),
                     _block_kv_lens(blk, k.shape[2], feat), dq, dk, dv,
                     None, scale, False, False, delta_from_p=False, row_scale=row_scale, out_lo=out_lo,
                     **_kernel_features(blk, feat))
    return dq, dk, dv


def _merge(acc_out: Tensor, acc_lse: Tensor, o: Tensor, lse: Tensor) -> None:
    """In place: (acc_out, acc_lse) ← the merge of two partials, lse = log2(2^acc_lse + 2^lse),
    out = (2^acc_lse·acc_out + 2^lse·o) / 2^lse_new; −inf lse is a partial that saw no key."""
    m = torch.maximum(acc_lse, lse)
    m = torch.where(m == float("-inf"), 0.0, m)
    wa, wb = torch.exp2(acc_lse - m), torch.exp2(lse - m)
    total = wa + wb
    acc_lse.copy_(m + torch.log2(total))
    total = torch.where(total == 0, 1.0, total)
    acc_out.mul_((wa / total).unsqueeze(-1)).add_(o.to(acc_out.dtype) * (wb / total).unsqueeze(-1))


# --------------------------------------------------------------------------------------------- autograd
def _blocks(q_chunks, k_chunks, window, feat: _Features):
    """The step's blocks (_plan), merged across chunks where nothing needs positions (ALiBi, dropout, documents
    and key padding (kv_lens, key_padding_mask) do)."""
    merge = (feat.alibi is None and feat.dropout_p == 0.0 and feat.docs is None and feat.kv_lens is None
             and feat.key_pad is None)
    return _plan(q_chunks, k_chunks, *window, merge=merge, docs=feat.docs)


def _directions(steps: tuple[int, int]):
    """(hop, last step) of the forward ring (K/V sent to rank + 1) and of the backward one (to rank − 1)."""
    return (1, steps[0]), (-1, steps[1])


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, ring: _Ring, chunks, scale: float, window: tuple[int, int], feat: _Features,
                backend: str):
        # fp32 inputs merge (and the torch blocks compute) in fp64: the output is rounded once, as the fp32 kernels'
        # is, and do_i·o_i (the sinks' gradient) is then as exact as theirs
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
        r, N = ring.rank, ring.size
        steps = _ring_steps(chunks, window, feat.docs)
        kv_shape = lambda rank: (2, *k.shape[:2], sum(n for _, n in chunks[rank % N]), q.shape[3])  # noqa: E731
        kvs = [torch.stack([k, v])] * 2  # one message per step and ring: [2, B, Hkv, L, D]
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64, device=q.device)  # merged in fp64
        for t in range(max(steps) + 1):
            pending = [None, None]
            for i, (hop, T) in enumerate(_directions(steps)):
                if t < T:  # the next shard is on its way while this one is computed
                    pending[i] = ring.exchange(kvs[i], kv_shape(r - hop * (t + 1)), kvs[i].dtype, tag=1 + 3 * i,
                                               hop=hop)
            for i, (hop, T) in enumerate(_directions(steps)):
                if not i <= t <= T:  # (the backward ring's first shard comes at step 1)
                    continue
                kv = kvs[i]
                for qa, qb, ka, kb, *blk in _blocks(chunks[r], chunks[(r - hop * t) % N], window, feat):
                    args = (q[:, :, qa:qb], kv[0, :, :, ka:kb], kv[1, :, :, ka:kb], scale, blk, feat, acc)
                    o, l2 = (_triton_block_forward if backend == "triton" else _torch_block_forward)(*args)
                    _merge(out[:, :, qa:qb], lse[:, :, qa:qb], o, l2)
            kvs = [kv if p is None else p.wait() for kv, p in zip(kvs, pending)]
        lse = torch.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: the kernels' convention
        if sinks is not None:  # on the merged (unrounded) output, as the op does on the kernels'
            _apply_sinks(out, lse, None, sinks)
        merged, out = out, out.to(q.dtype)
        out_lo = None
        if q.dtype in (torch.float16, torch.bfloat16):  # fp32 keeps the fp64 LSE: its backward's p is formed from it
            lse = lse.float()
            # what rounding the output dropped: D_i = do_i·(out_i + out_lo_i) in the backward, as the kernels' op
            # forms it (README, Numerics)
            out_lo = (merged - out.to(merged.dtype)).to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, out, lse, out_lo)
        ctx.set_materialize_grads(False)
        # the returned LSE in natural units (fastattn.attention's return_lse), converted in fp64, rounded once
        lse_out = (lse.double() * math.log(2.0)).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        ctx.ring, ctx.chunks, ctx.scale, ctx.window, ctx.feat, ctx.backend, ctx.steps = (ring, chunks, scale, window,
                                                                                          feat, backend, steps)
        return out, lse_out

    @staticmethod
    @once_differentiable  # the ring's transfers are not differentiable: double backward raises, never miscomputes
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse, out_lo = ctx.saved_tensors
        if dout is None:  # only the LSE was differentiated
            dout = torch.zeros_like(out)
        # dlse2, the gradient of lse2 = LSE·log2(e) (the kernels' dlse), as lse; the torch blocks take dLSE
        dlse2 = None if dlse is None else (dlse.double() * math.log(2.0)).to(lse.dtype)
        ring, chunks, scale, window, feat, backend, steps = (ctx.ring, ctx.chunks, ctx.scale, ctx.window, ctx.feat,
                                                             ctx.backend, ctx.steps)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        r, N = ring.rank, ring.size
        do = lastdim_contiguous(dout)
        kv_shape = lambda rank: (2, *k.shape[:2], sum(n for _, n in chunks[rank % N]), q.shape[3])  # noqa: E731
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kvs = [torch.stack([k, v])] * 2
        homes, pending_dkv = [], [None, None]
        for t in range(max(steps) + 1):
            pending_kv = [None, None]
            for i, (hop, T) in enumerate(_directions(steps)):
                if t < T:
                    pending_kv[i] = ring.exchange(kvs[i], kv_shape(r - hop * (t + 1)), kvs[i].dtype, tag=2 + 3 * i,
                                                  hop=hop)
            for i, (hop, T) in enumerate(_directions(steps)):
                if not i <= t <= T:
                    continue
                kv = kvs[i]
                # dK/dV of the shard in hand from this rank's queries; the contributions of the ranks that held it
                # before arrive meanwhile and are added below.
                dkv = torch.zeros((2, *kv.shape[1:]), dtype=acc, device=q.device)
                for qa, qb, ka, kb, *blk in _blocks(chunks[r], chunks[(r - hop * t) % N], window, feat):
                    rows = (do[:, :, qa:qb], q[:, :, qa:qb], kv[0, :, :, ka:kb], kv[1, :, :, ka:kb],
                            out[:, :, qa:qb], None if out_lo is None else out_lo[:, :, qa:qb], lse[:, :, qa:qb],
                            None if dlse2 is None else dlse2[:, :, qa:qb], scale, blk, feat)
                    if backend == "triton":  # D_i from the global out, formed by the kernels' own delta pass
                        g = _triton_block_backward(*rows)
                    else:
                        g = _torch_block_backward(*rows, acc)
                    dq[:, :, qa:qb] += g[0]
                    dkv[0, :, :, ka:kb] += g[1]
                    dkv[1, :, :, ka:kb] += g[2]
                if t > i:
                    dkv += pending_dkv[i].wait()
                if t < T:  # to the next rank of this ring, which holds this shard at the next step
                    pending_dkv[i] = ring.exchange(dkv, kv_shape(r - hop * (t + 1)), acc, tag=3 + 3 * i, hop=hop)
                elif T > 0:  # complete: straight to the rank that owns the shard
                    pending_dkv[i] = ring.exchange(dkv, kv_shape(r), acc, tag=3 + 3 * i, hop=-hop * T)
                else:  # the forward ring's step 0 only: this rank's own shard
                    homes.append(dkv)
            kvs = [kv if p is None else p.wait() for kv, p in zip(kvs, pending_kv)]
        homes += [pending_dkv[i].wait() for i, (_, T) in enumerate(_directions(steps)) if T > 0]
        home = homes[0] if len(homes) == 1 else homes[0] + homes[1]
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:  # this rank's rows' share (as for any replicated weight)
            dsinks = _sink_row_grad(do, out, out_lo, lse, dlse2, sinks).sum((0, 2)).to(sinks.dtype)
        return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype), dsinks, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------- Ulysses
def _all_to_all(send: list, lengths: list[int], ring: _Ring) -> list:
    """send[s] [B, h, n_s, ...] to rank s; -> what each rank s sent here, [B, h, lengths[s], ...]. Pieces travel
    padded to the longest along dim 2 (gloo's all-to-all moves equal shapes)."""
    longest = max(max(lengths), max(t.shape[2] for t in send))
    pad = lambda t: t if t.shape[2] == longest else torch.cat(  # noqa: E731
        [t, t.new_zeros((*t.shape[:2], longest - t.shape[2], *t.shape[3:]))], 2)
    send = [pad(t.to(ring.comm_device)).contiguous() for t in send]
    recv = [torch.empty_like(send[0]) for _ in send]
    dist.all_to_all(recv, send, group=ring.group)
    _SENT["bytes"] += sum(t.numel() * t.element_size() for s, t in enumerate(send) if s != ring.rank)
    _SENT["messages"] += ring.size - 1
    return [t.narrow(2, 0, n) for t, n in zip(recv, lengths)]


def _seq_to_heads(xs: list, ring: _Ring, chunks) -> list:
    """This rank's shards [B, Hx, L_local, D] of every head of each tensor of ``xs`` (one dtype, B and D) -> the
    whole sequence [B, Hx/N, L, D] (global order) of this rank's head group of each (rank r: heads r·Hx/N ..), by
    one all-to-all: a rank's pieces of every tensor travel together."""
    N, hs = ring.size, [x.shape[1] // ring.size for x in xs]
    recv = _all_to_all([torch.cat([x[:, s * h:(s + 1) * h] for x, h in zip(xs, hs)], 1) for s in range(N)],
                       [sum(n for _, n in chunks[s]) for s in range(N)], ring)
    parts = []  # (position, piece): each rank's chunks to their places
    for s, t in enumerate(recv):
        offset = 0
        for start, n in chunks[s]:
            if n:
                parts.append((start, t.narrow(2, offset, n)))
            offset += n
    whole = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], 2) if parts else recv[0]  # (L = 0)
    return [t.to(xs[0].device) for t in whole.split(hs, 1)]


def _heads_to_seq(ys: list, ring: _Ring, chunks) -> list:
    """The inverse of :func:`_seq_to_heads`: each [B, h, L, D] of this rank's heads -> its shard
    [B, h·N, L_local, D]."""
    N, mine, hs = ring.size, sum(n for _, n in chunks[ring.rank]), [y.shape[1] for y in ys]
    recv = _all_to_all([torch.cat([torch.cat([y.narrow(2, start, n) for start, n in chunks[s]], 2) for y in ys], 1)
                        for s in range(N)], [mine] * N, ring)
    return [torch.cat([t.split(hs, 1)[i] for t in recv], 1).to(ys[0].device) for i in range(len(ys))]


class _SeqToHeads(torch.autograd.Function):
    """q, k, v shards -> their head groups of the whole sequence (one all-to-all; the backward's, the adjoint
    permutation, runs whenever any of them needs a gradient, so every rank runs it alike)."""
    @staticmethod
    def forward(ctx, q, k, v, ring, chunks):
        ctx.ring, ctx.chunks = ring, chunks
        return tuple(_seq_to_heads([q, k, v], ring, chunks))

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        return (*_heads_to_seq([dq, dk, dv], ctx.ring, ctx.chunks), None, None)


class _HeadsToSeq(torch.autograd.Function):
    """The output's (and the LSE's, float32) head groups of the whole sequence -> this rank's shards; the backward
    moves both gradients (zeros for one that is not used) on every rank alike."""
    @staticmethod
    def forward(ctx, out, lse, ring, chunks):  # -> out, or (out, lse) where an LSE is given
        ctx.ring, ctx.chunks, ctx.lse = ring, chunks, lse is not None
        (out,) = _heads_to_seq([out], ring, chunks)
        return out if lse is None else (out, _heads_to_seq([lse.unsqueeze(-1)], ring, chunks)[0].squeeze(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse=None):
        (dout,) = _seq_to_heads([dout], ctx.ring, ctx.chunks)
        dlse = _seq_to_heads([dlse.unsqueeze(-1)], ctx.ring, ctx.chunks)[0].squeeze(-1) if ctx.lse else None
        return dout, dlse, None, None


def _ulysses(q, k, v, ring: _Ring, chunks, causal, scale, window, cap, slopes, sinks, docs, kv_lens, kv_list,
             key_pad, return_lse, backend):
    """strategy="ulysses": the whole sequence of H/N heads on each rank, one fastattn.attention call, back."""
    from .ops.attention import attention
    N, r = ring.size, ring.rank
    B, H, _, D = q.shape
    if H % N:
        raise ValueError(f"strategy='ulysses' needs the query heads ({H}) to be a multiple of the ranks ({N}): "
                         "use strategy='ring'")
    if k.shape[1] % N:  # each rank's query heads need whole K/V heads of their own: each repeated, to lcm(Hkv, N)
        # heads (which divides H), so query head h still reads kv head h // (H/Hkv)
        k, v = (t.repeat_interleave(math.lcm(k.shape[1], N) // k.shape[1], dim=1) for t in (k, v))
    qh, kh, vh = _SeqToHeads.apply(q, k, v, ring, chunks)
    heads = slice(r * (H // N), (r + 1) * (H // N))
    slopes = None if slopes is None else slopes[:, heads].contiguous()
    kw = dict(causal=causal, scale=scale, window_size=window, softcap=cap, return_lse=return_lse, backend=backend,
              sinks=None if sinks is None else sinks[heads])
    L = qh.shape[2]
    if docs is None or B == 0 or L == 0:
        res = attention(qh, kh, vh, kv_lens=kv_lens, key_padding_mask=key_pad, alibi_slopes=slopes, **kw)
    else:  # packed documents: each batch entry's, one after another (fastattn.attention's varlen path)
        bounds = sorted(set(docs))
        cu = torch.tensor(sorted({b * L + d for b in range(B) for d in bounds}), dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        if slopes is not None and slopes.shape[0] > 1:  # per batch entry: one row per packed sequence
            slopes = slopes.repeat_interleave(len(bounds) - 1, dim=0)
        packed = [t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3]) for t in (qh, kh, vh)]
        cu_k, longest_k = cu, longest
        if kv_lens is not None:  # each document's keys cut at kv_lens[b]: a prefix of it, so top-left indices
            # (causal, windows, ALiBi) stay its positions
            keep = [(b * L + a, max(0, min(e, n) - a)) for b, n in enumerate(kv_list)  # (read in the checks)
                    for a, e in zip(bounds, bounds[1:])]
            index = torch.cat([torch.arange(a, a + n, device=q.device) for a, n in keep])
            packed[1:] = [t.index_select(0, index) for t in packed[1:]]
            cu_k = torch.tensor([0] + [n for _, n in keep], device=q.device).cumsum(0).to(torch.int32)
            longest_k = max(n for _, n in keep)
        res = attention(*packed, cu_seqlens_q=cu, cu_seqlens_k=cu_k, max_seqlen_q=longest, max_seqlen_k=longest_k,
                        alibi_slopes=slopes, **kw)
        unpack = lambda o: o.reshape(B, L, o.shape[1], D).transpose(1, 2)  # noqa: E731
        res = (unpack(res[0]), res[1].reshape(-1, B, L).transpose(0, 1)) if return_lse else unpack(res)
    return _HeadsToSeq.apply(*(res if return_lse else (res, None)), ring, chunks)


# --------------------------------------------------------------------------------------------- public
def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if code < len(_DTYPES) else "an unsupported dtype"


def _docs_list(cu_seqlens) -> Optional[list[int]]:
    """cu_seqlens (None, ints, or a 1-d int tensor) as a list of ints (one host sync for a GPU tensor)."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be a 1-d int32/int64 tensor or a list of ints, got "
                            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.tolist()
    if (not isinstance(cu_seqlens, (list, tuple)) or len(cu_seqlens) < 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens)):
        raise TypeError(f"cu_seqlens must be a list of at least 2 ints (or a 1-d int tensor), got {cu_seqlens!r}")
    if not all(0 <= x < 1 << 62 for x in cu_seqlens):  # (before the exchange, which carries them as int64)
        raise ValueError(f"cu_seqlens must hold positions >= 0, got {cu_seqlens}")
    return [int(x) for x in cu_seqlens]


def _crc(values: Optional[list[int]]) -> int:
    """CRC-32 of a list of ints (−1 for None): lists that must agree across ranks travel as it."""
    return -1 if values is None else zlib.crc32(struct.pack(f"<{len(values)}q", *values))


def _bits_f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _f64_bits(x: float) -> int:  # floats travel in the int64 meta exchange bit for bit
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _check_shards(metas: list[list[int]], N: int, layout: str) -> int:
    """Every rank runs the same checks on every rank's shapes, so a bad input raises on all ranks (no hang).
    -> the global length L."""
    def name(i):
        return ("q", "k", "v")[i]
    for r, m in enumerate(metas):
        shapes, dtypes = [m[0:4], m[4:8], m[8:12]], m[12:15]
        for i, s in enumerate(shapes):
            if s[0] < 0:
                raise ValueError(f"rank {r}: {name(i)} must be a (B, H, L_local, D) shard, got {s[3]} dims")
        if len(set(dtypes)) != 1:
            raise TypeError(f"rank {r}: q, k, v dtypes differ: {[_dtype_name(d) for d in dtypes]}")
        (B, H, L, D), (Bk, Hkv, Lk, Dk), sv = shapes
        if [Bk, Hkv, Lk, Dk] != sv:
            raise ValueError(f"rank {r}: k {tuple(shapes[1])} and v {tuple(sv)} must have the same shape")
        if Bk != B:
            raise ValueError(f"rank {r}: batch sizes differ: q {B}, k/v {Bk}")
        if Dk != D:
            raise ValueError(f"rank {r}: head dims differ: q {D}, k/v {Dk}")
        if Hkv == 0 or H % Hkv:
            raise ValueError(f"rank {r}: q's {H} heads must be a multiple of k/v's {Hkv} heads (GQA)")
        if Lk != L:
            raise ValueError(f"rank {r}: k/v hold {Lk} positions and q {L}: context-parallel self-attention needs "
                             "the shards of q, k and v at the same positions")
    for i, what in ((0, "batch sizes"), (1, "query heads"), (5, "k/v heads"), (3, "head dims"), (12, "dtypes"),
                    (15, "causal flags"), (16, "layouts")):
        values = [m[i] for m in metas]
        if i == 12:
            values = [_dtype_name(c) for c in values]
        elif i == 16:
            values = [LAYOUTS[c] for c in values]
        if len(set(values)) != 1:
            raise ValueError(f"the shards differ across ranks in {what}: {values} (ranks 0..{N - 1}): every rank must "
                             "pass its shard of the same q, k, v and the same options")
    return _check_lengths([m[2] for m in metas], N, layout, "context_parallel_attention")


def _eager_under_compile(fn):
    """``torch.compiler.disable(fn)``, made at the first call: under torch.compile a graph break, ``fn`` run eagerly
    (the host-driven ring and exchanges), without importing torch._dynamo, which imports triton, at ``import
    fastattn`` (a triton imported before TRITON_INTERPRET is set runs no kernel on the CPU: tests/test_errors.py)."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return call


@_eager_under_compile
def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = False,
                               layout: str = "zigzag", scale: Optional[float] = None, dropout_p: float = 0.0,
                               sinks: Optional[Tensor] = None, window_size: tuple[int, int] = (-1, -1),
                               alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0, cu_seqlens=None,
                               kv_lens: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                               return_lse: bool = False, backend: str = "auto", strategy: str = "ring",
                               _error: Optional[Exception] = None) -> Tensor:
    """This rank's shard of ``softmax(q·kᵀ·scale)·v`` over the whole sequence, with autograd (ring attention).

    q: [B, H, L_local, D], k/v: [B, Hkv, L_local, D] (H % Hkv == 0: GQA, K/V travel with Hkv heads): this rank's
    shards, from :func:`shard` with the same ``group`` (default: the world) and ``layout``. ``causal``: top-left
    in global positions (query i sees keys j <= i). Per block: the Triton kernels with fp32 outputs when
    ``backend`` resolves to "triton" (CUDA tensors), plain torch in fp32 (float64 for float64 inputs) for
    "torch" (CPU). Every call all-gathers the ranks' shapes (one small collective): any length works and bad
    input raises the same error on every rank. Every rank of the group must call it. ``sinks``: float [H], as
    fastattn.attention's (the same on every rank); its gradient is this rank's rows' share, summed over the group
    as any replicated parameter's is. ``window_size`` (left, right), −1 unbounded: query i sees key j iff
    i − left <= j <= i + right in global positions (causal: right = 0), as fastattn.attention's; blocks outside
    every window are skipped and the ring stops after the last step whose keys some window reaches (with the
    "contiguous" layout and a causal or left-only window shorter than a shard, one step; a window reaching right
    gets the next shards from a second ring running backward, where that sends fewer messages: a window shorter
    than a shard both ways, one step each way). ``alibi_slopes`` (fp32 [H] or
    [B, H], the same on every rank, checked; no gradient) and ``softcap`` c > 0 (scores c·tanh(s/c)) as
    fastattn.attention's, in global positions. ``dropout_p`` in [0, 1): dropout of the attention weights, with the
    mask that fastattn.attention's kernels draw for the whole sequence from the same seed (rank 0's draw from
    torch's CPU generator): the same result as one process running fastattn.attention(backend="triton") after the
    same torch.manual_seed.
    ``cu_seqlens`` (ints, a list or an int tensor, the same on every rank): documents packed in the sequence, at
    global positions cu[d] .. cu[d + 1] (cu[0] = 0, cu[−1] = L), for every batch entry: a query sees keys of its
    own document only (as fastattn.attention with cu_seqlens_q = cu_seqlens_k = cu on the packed sequence; with
    dropout, the mask is the whole sequence's, not the per-document one of fastattn.attention's packed path).
    ``kv_lens`` (int [B], the same on every rank): keys at global positions >= kv_lens[b] are padding, as
    fastattn.attention's kv_lens (rows past it still attend to the keys before it).
    ``key_padding_mask`` (bool [B, L_local], True = padding, nn.MultiheadAttention's convention): this rank's
    shard of a key padding mask of the whole sequence (``shard(mask, group, dim=1)``), padding anywhere; it is
    all-gathered once per call (B·L bytes). A row that sees no key gives 0.
    ``return_lse``: also this rank's rows' log-sum-exp of the scores [B, H, L_local] (natural log, sinks included:
    a row that sees no key gives its sink, +inf without sinks; fp32, fp64 for fp64 inputs), differentiable, as
    fastattn.attention's.
    ``strategy``: "ring" (the default: ring attention, any N) or "ulysses" (DeepSpeed-Ulysses: an all-to-all gives
    each rank the whole sequence for H/N of the heads (H % N == 0; K/V heads repeated to lcm(Hkv, N) where
    Hkv % N != 0), one fastattn.attention call on them, with any backend, and an all-to-all back (one more for the
    LSE); the backward the same reversed; each rank sends (N − 1)/N of its shards; not with dropout, nor with
    cu_seqlens together with key_padding_mask).
    (``_error``: a caller's own check that failed on this rank, e.g.
    nn.MultiheadAttention's: it joins the exchange, and is raised after it.)
    """
    # This rank's own checks run before the exchange of shapes; a failure joins it, flagged (_gather_checked).
    error, use = _error, "torch"
    left, right, cap, slopes, seed, docs, kv_list, slopes_bits = -1, -1, 0.0, None, 0, None, None, None
    try:
        if error is not None:
            raise error
        check_tensor(q, "q")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
        _check_layout(layout)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "ulysses" and dropout_p > 0.0:
            raise NotImplementedError("strategy='ulysses' does not take dropout (its heads' dropout masks would not "
                                      "be the whole sequence's): use strategy='ring'")
        if strategy == "ulysses" and cu_seqlens is not None and key_padding_mask is not None:
            raise NotImplementedError("strategy='ulysses' runs packed documents (cu_seqlens) on fastattn.attention's "
                                      "varlen path, which takes no key_padding_mask: use strategy='ring'")
        for t, n in ((k, "k"), (v, "v")):
            check_tensor(t, n)
            check_same(q, "q", t, n, dtype=False)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite float (None: 1/sqrt(head dim)), got {scale!r}")
        if q.dim() == 4 and q.shape[3] == 0:
            raise ValueError(f"head dim of q must be >= 1, got shape {tuple(q.shape)}")
        if q.dim() == 4:
            check_sinks(sinks, q, q.shape[1])
        left, right, slopes, cap = _check_features(q, *(q.shape[:2] if q.dim() == 4 else (1, 1)), window_size,
                                                   alibi_slopes, softcap)
        # any bound past every length is unbounded (and fits the int64 exchange of options)
        left, right = (-1 if w >= 1 << 62 else w for w in (left, right))
        # the slopes' bits, compared across ranks by CRC (a host sync of H values)
        slopes_bits = None if slopes is None else slopes.detach().cpu().view(torch.int32).flatten().tolist()
        docs = _docs_list(cu_seqlens)
        if kv_lens is not None:
            check_kv_lens(kv_lens, q, q.shape[0] if q.dim() == 4 else None)
            kv_list = kv_lens.tolist()  # a host sync: checked across ranks and against L below
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (B, L_local), True = padding, got "
                                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            check_same(q, "q", key_padding_mask, "key_padding_mask", dtype=False)
            if q.dim() == 4 and tuple(key_padding_mask.shape) != (q.shape[0], q.shape[2]):
                raise ValueError(f"key_padding_mask must be this rank's shard (B, L_local)=({q.shape[0]}, "
                                 f"{q.shape[2]}) of the mask, got shape {tuple(key_padding_mask.shape)}")
        if dropout_p > 0.0:  # as fastattn.attention draws it; rank 0's is used
            seed = int(torch.randint(1 << 31, 1 << 62, (), dtype=torch.int64))
        if causal:
            right = 0
        if q.dtype not in _DTYPES:
            raise TypeError(f"q has dtype {q.dtype}; floating dtypes {_DTYPES} are supported")
        # auto: the Triton blocks where they run and take the call, else the torch blocks (as attention() falls
        # back for float64 and head dims over 256); the CUDA C++ kernels cannot run the blocks
        use = dispatch.select(backend, q, lambda b: b == "triton" and kernels_take((q, "q"))(b)
                              and (q.dim() != 4 or q.shape[3] <= MAX_HEAD_DIM))
        if use == "cuda" and strategy == "ring":
            raise NotImplementedError("context_parallel_attention runs its blocks with backend 'triton' or 'torch'; "
                                      "the CUDA C++ kernels do not write the fp32 partial outputs it merges")
        if use in ("triton", "cuda"):  # (cuda: Ulysses' one call) the kernels' checks, before any exchange
            check_kernel_dtype(q, "q", use)
            if q.dim() == 4 and q.shape[3] > MAX_HEAD_DIM:
                raise ValueError(f"head dim {q.shape[3]} is larger than the kernels' {MAX_HEAD_DIM}")
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        error = e
    if error is not None and not (dist.is_available() and dist.is_initialized()):
        raise error  # no group to tell
    rank, N = _group_info(group)
    try:
        device = _comm_device(group, q)
    except ValueError as e:  # NCCL and CPU tensors on this rank: it still joins the exchange
        error, device = error or e, _comm_device(group, None)

    def shape4(t):
        return list(t.shape) if isinstance(t, Tensor) and t.dim() == 4 else [-1, -1, -1, getattr(t, "ndim", 0)]

    scale_bits = _f64_bits(float(scale) if isinstance(scale, (int, float)) else 0.0)
    meta = shape4(q) + shape4(k) + shape4(v) + [_DTYPE_CODE.get(getattr(t, "dtype", None), len(_DTYPES))
                                                  for t in (q, k, v)]
    meta += [int(bool(causal)), LAYOUTS.index(layout) if layout in LAYOUTS else 0, scale is None, scale_bits,
             int(torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k, v, sinks))),
             int(sinks is not None), left, right, _f64_bits(cap),
             _f64_bits(float(dropout_p) if isinstance(dropout_p, (int, float)) else 0.0), _crc(slopes_bits),
             seed, -1 if docs is None else len(docs), _crc(docs), _crc(kv_list), min(kv_list or [0]),
             max(kv_list or [0]), int(key_padding_mask is not None),
             STRATEGIES.index(strategy) if strategy in STRATEGIES else 0, int(bool(return_lse)),
             _BACKENDS.index(use) if use in _BACKENDS else -1]
    metas = _gather_checked(meta, error, group, N, device, "context_parallel_attention")

    def same(indices):
        for i, what in indices:
            values = [m[i] for m in metas]
            if len(set(values)) != 1:
                shown = [("default" if m[17] else _bits_f64(m[18])) for m in metas] if what == "scales" \
                    else [_bits_f64(x) for x in values] if what in ("softcaps", "dropout probabilities") else values
                raise ValueError(f"the ranks pass different {what}: {shown} (ranks 0..{N - 1}): every rank must "
                                 "pass the same options")

    same(((17, "scales"), (18, "scales"), (19, "grad modes (inputs that require grad)"), (20, "sinks (given or not)")))
    L = _check_shards([m[:17] for m in metas], N, layout)
    same(((21, "windows (left)"), (22, "windows (right; causal: 0)"), (23, "softcaps"), (24, "dropout probabilities"),
          (25, "ALiBi slopes (values' CRC-32; −1: none)"), (27, "cu_seqlens (lengths)"),
          (28, "cu_seqlens (values' CRC-32)"),
          (29, "kv_lens (values' CRC-32)"), (32, "key_padding_mask (given or not)"), (33, "strategies"),
          (34, "return_lse flags"), (35, "backends (0 torch, 1 triton, 2 cuda)")))
    if docs is not None and (docs[0] != 0 or docs[-1] != L or any(a > b for a, b in zip(docs, docs[1:]))):
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {L}, got {docs}")
    chunks = [_rank_chunks(L, N, r, layout) for r in range(N)]
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    q, k, v = lastdim_contiguous(q), lastdim_contiguous(k), lastdim_contiguous(v)
    doc_of = None if docs is None else (torch.searchsorted(torch.tensor(docs, device=q.device),
                                                           torch.arange(L, device=q.device), right=True) - 1).int()
    if kv_list and (metas[0][30] < 0 or metas[0][31] > L):  # the same on every rank: the same kv_lens and L
        raise ValueError(f"kv_lens must lie in [0, L={L}], got values in [{metas[0][30]}, {metas[0][31]}]")
    key_pad = None
    if key_padding_mask is not None:  # the whole sequence's [B, L] on every rank (uint8: as every backend moves)
        key_pad = _gather_shards(key_padding_mask.to(torch.uint8), [m[2] for m in metas], 1, layout, group,
                                 device).bool()
    if strategy == "ulysses":
        return _ulysses(q, k, v, _Ring(group, rank, N, device), chunks, causal, scale, (left, right), cap, slopes,
                        sinks, docs, kv_lens, kv_list, key_pad, return_lse, backend)
    feat = _Features(cap, slopes, float(dropout_p), metas[0][26], L, docs, doc_of,
                     None if kv_lens is None else kv_lens.to(torch.int32), key_pad)
    out, lse = _RingAttention.apply(q, k, v, sinks, _Ring(group, rank, N, device), chunks, scale, (left, right),
                                    feat, use)
    return (out, lse) if return_lse else out
