"""Context parallelism (fastattn.distributed): ring attention on the CPU with gloo, in 2 and 4 spawned processes.

Every output and gradient, gathered with ``unshard``, is compared with the float64 reference on the full sequence
under DESIGN.md §5, the baseline being the single-process fastattn result in the same dtype (on the CPU: the
reference in that dtype). Spawning costs seconds, so each world size is spawned once (a module fixture): its
processes run every case of that size and write one result per case and rank, which the tests read. A hang fails
after the timeout (the processes are killed). `gpu` tests run the cases with NCCL when two or more GPUs exist.
"""
import contextlib
import math
import copy
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastattn
import fastattn.nn
from fastattn import masks
from fastattn import distributed as fd
from fastattn.distributed import context_parallel_attention, shard, unshard
from fastattn.testing import BACKWARD_FACTOR, FORWARD_FACTOR, compare, forward_backward, run_distributed

TIMEOUT = 240.0  # seconds for a whole suite; a hang fails after this


# ------------------------------------------------------------------------------------------- helpers (in workers)
@dataclass
class Env:
    rank: int
    world: int
    device: str
    groups: dict  # name -> process group; created in the same order on every rank


def _inputs(B, H, Hkv, L, D, seed, device):
    """Full-sequence q, k, v, do: the same on every rank (same seed)."""
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(s, generator=g) for s in ((B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, D), (B, H, L, D))]
    return [x.to(device) for x in t[:3]], t[3].to(device)


def _run_cp(group, qkv, do, dtype, sinks=None, dlse=None, **kw):
    """Context-parallel forward + backward on this rank's shards -> the unsharded out, dq, dk, dv (and dsinks,
    summed over the group; with ``dlse``, the LSE too, differentiated against it)."""
    layout = kw.get("layout", "zigzag")
    shards = [shard(t.detach().to(dtype), group, layout=layout).requires_grad_() for t in qkv]
    if kw.get("key_padding_mask") is not None:  # [B, L]: this rank's keys' part
        kw["key_padding_mask"] = shard(kw["key_padding_mask"], group, dim=1, layout=layout)
    if sinks is not None:
        kw["sinks"] = sinks = sinks.detach().to(dtype).requires_grad_()
    out = context_parallel_attention(*shards, group, return_lse=dlse is not None, **kw)
    if dlse is not None:
        out, lse = out
        assert lse.shape == shards[0].shape[:3] and lse.dtype == (torch.float64 if dtype == torch.float64
                                                                   else torch.float32)
        torch.autograd.backward([out, lse], [shard(do.to(dtype), group, layout=layout),
                                             shard(dlse.to(lse.dtype), group, layout=layout)])
    else:
        out.backward(shard(do.to(dtype), group, layout=layout))
    assert out.dtype == dtype and out.shape == shards[0].shape
    names = ("out", "dq", "dk", "dv")
    res = {n: unshard(t.detach(), group, layout=layout) for n, t in zip(names, (out, *[s.grad for s in shards]))}
    if dlse is not None:
        res["lse"] = unshard(lse.detach(), group, layout=layout)
    if sinks is not None:
        total = sinks.grad.double()
        dist.all_reduce(total, group=group)
        res["dsinks"] = total.to(dtype)
    return res


def _single(qkv, do, dtype, causal, scale=None, sinks=None, dlse=None, **features):
    """Single-process fastattn on the full sequence (backend "reference": fastattn.reference) in ``dtype``;
    ``features``: window_size, alibi_slopes, softcap, dropout_p with dropout_mask, cu_seqlens (as the bool mask
    of same-document pairs)."""
    cu = features.pop("cu_seqlens", None)
    if cu is not None:
        L = qkv[0].shape[2]
        doc = torch.searchsorted(torch.tensor(cu), torch.arange(L), right=True).to(qkv[0].device)
        features["attn_bias"] = doc[:, None] == doc[None, :]

    def fn(q, k, v, sinks):
        res = fastattn.attention(q, k, v, causal=causal, scale=scale, sinks=sinks, backend="reference",
                                 return_lse=dlse is not None, **features)
        return {"out": res} if dlse is None else {"out": res[0], "lse": res[1]}
    q, k, v = (t.detach().requires_grad_() for t in qkv)
    sinks = None if sinks is None else sinks.detach().requires_grad_()
    return forward_backward(fn, dict(q=q, k=k, v=v, sinks=sinks), {"out": do, "lse": dlse}, dtype)


def _assert_rule(got: dict, ref64: dict, low: dict):
    results = [compare(got[n], ref64[n], low[n], name=n, factor=FORWARD_FACTOR if n == "out" else BACKWARD_FACTOR)
               for n in ref64]
    failed = [str(c) for c in results if not c.ok]
    assert not failed, "\n".join(failed)


@contextlib.contextmanager
def _count_triton_calls():
    """Counts the launches of fastattn.triton.attention.forward / backward (the ring's block kernels)."""
    from fastattn.triton import attention as kernels
    calls = {"forward": 0, "backward": 0}
    originals = {n: getattr(kernels, n) for n in calls}

    def counting(name):
        def fn(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return fn
    try:
        for n in calls:
            setattr(kernels, n, counting(n))
        yield calls
    finally:
        for n, f in originals.items():
            setattr(kernels, n, f)


def _docs(L, many=False):
    """Document boundaries for a length-L sequence: three documents, one of length 1 where L allows; ``many``: also
    one every 5 positions and an empty one (position 7 twice)."""
    cuts = {0, L // 3, min(L, L // 3 + 1), L}
    return sorted([*cuts, *range(5, L, 5), min(L, 7), min(L, 7)]) if many else sorted(cuts)


# ------------------------------------------------------------------------------------------- cases
def case_matches_single(env, *, dtype, causal, layout, B=2, H=4, Hkv=2, L=37, D=16, scale=None, backend="auto",
                        seed=0, group="world", sinks=False, alibi=False, lse=False, doc_mask_elems=None,
                        strategy="ring", **features):
    """CP forward + backward against the float64 reference on the full sequence (§5). ``alibi``: the paper's
    slopes; ``features`` (window_size, softcap, dropout_p) as fastattn.attention's; ``doc_mask_elems``: the
    largest same-document mask of a block (documents past it get blocks of their own). With dropout every rank seeds
    torch's CPU generator alike, and the reference replays the mask that fastattn.attention's kernels draw for the
    whole sequence from rank 0's seed (so one process's Triton run drops the same weights)."""
    group = env.groups[group]
    qkv, do = _inputs(B, H, Hkv, L, D, seed, env.device)
    if alibi:  # "batch": [B, H], a different scale per batch entry
        slopes = fastattn.alibi_slopes(H)
        if alibi == "batch":
            slopes = (slopes[None] * (1.0 + torch.arange(B)[:, None]) / B).contiguous()
        features["alibi_slopes"] = slopes.to(env.device)
    if "kv_lens" in features:
        features["kv_lens"] = torch.tensor(features["kv_lens"], dtype=torch.int32, device=env.device)
    if features.get("key_padding_mask"):  # random padding, and the last batch entry's first L/4 keys (left
        # padding: with causal, its first rows see no key)
        pad = torch.rand(B, L, generator=torch.Generator().manual_seed(seed + 3)) < 0.3
        pad[-1, :L // 4] = True
        features["key_padding_mask"] = pad.to(env.device)
    torch.manual_seed(1000 + seed)
    # around ln(L): a fair share of each row's weight
    sinks = (torch.randn(H, generator=torch.Generator().manual_seed(seed)) + math.log(L)).to(env.device) \
        if sinks else None
    dlse = torch.randn(qkv[0].shape[:3], generator=torch.Generator().manual_seed(seed + 7)).to(env.device) \
        if lse else None
    saved_elems = fd._DOC_MASK_ELEMS
    try:
        fd._DOC_MASK_ELEMS = doc_mask_elems or saved_elems
        with _count_triton_calls() as calls:
            got = _run_cp(group, qkv, do, dtype, causal=causal, layout=layout, scale=scale, backend=backend,
                          sinks=sinks, dlse=dlse, strategy=strategy, **features)
    finally:
        fd._DOC_MASK_ELEMS = saved_elems
    if strategy == "ulysses":  # one fastattn.attention call, whichever backend it takes
        pass
    elif backend == "triton" or (backend == "auto" and env.device != "cpu"):
        assert calls["forward"] > 0 and calls["backward"] > 0, f"the Triton kernels were not called: {calls}"
    else:
        assert calls == {"forward": 0, "backward": 0}, calls
    if dist.get_rank(group) != 0:  # the comparisons once per group
        return
    p = features.get("dropout_p", 0.0)
    if p:
        torch.manual_seed(1000 + seed)  # the seed fastattn.attention and rank 0 drew
        drawn = int(torch.randint(1 << 31, 1 << 62, (), dtype=torch.int64))
        Lg = qkv[0].shape[2]
        keep = masks.dropout_keep(drawn, p, torch.arange(B * H * Lg * Lg, device=env.device).view(
            B, H, Lg, Lg))
        assert 0.5 * p < 1 - keep.float().mean().item() < 1.5 * p
        features["dropout_mask"] = keep
        if backend == "triton":  # one process, the Triton kernels, the same torch seed: the same mask
            torch.manual_seed(1000 + seed)
            kw = {n: x for n, x in features.items() if n not in ("dropout_mask", "cu_seqlens")}
            _, mask1 = fastattn.attention(*[t.to(dtype) for t in qkv], causal=causal, scale=scale,
                                          return_dropout_mask=True, backend="triton", **kw)
            assert torch.equal(mask1, keep)
    single = [_single(qkv, do, d, causal, scale, sinks, dlse, **features) for d in (torch.float64, dtype)]
    _assert_rule(got, *single)


def case_shard_roundtrip(env):
    """shard gives tensor_split's chunks (r and 2N−1−r, or r) for any length, empty chunks included; unshard
    inverts it exactly."""
    N, r = env.world, env.rank
    for L in (1, 2 * N - 1, 2 * N + 3, 37):
        x = torch.arange(L * 3, device=env.device).view(3, L).float()
        for layout in fd.LAYOUTS:
            parts = torch.tensor_split(x, 2 * N if layout == "zigzag" else N, dim=1)
            mine = torch.cat([parts[r], parts[2 * N - 1 - r]] if layout == "zigzag" else [parts[r]], 1)
            s = shard(x, dim=1, layout=layout)
            assert torch.equal(s, mine) and s.shape[1] == fd.shard_lengths(L, N, layout)[r]
            assert torch.equal(unshard(s, dim=-1, layout=layout), x)


def case_error_vs_ranks(env):
    """The error against float64 does not grow with N: for N = 1, 2, 4 (groups of ranks 0.., fp16, causal zigzag)
    the max errors of the output and every gradient are within 1.5× of each other, and so are the mean errors
    within 5 %: in fp16 both are set by the final rounding, while rounding the partial outputs or the travelling
    dK/dV to 16 bits between steps raises the mean errors at N = 4 by 10–25 % (measured)."""
    qkv, do = _inputs(1, 4, 2, 96, 16, 5, env.device)
    errs = {}
    for n in (1, 2, 4):
        if env.rank < n:
            got = _run_cp(env.groups[f"first{n}"], qkv, do, torch.float16, causal=True)
            if env.rank == 0:
                ref64 = _single(qkv, do, torch.float64, True)
                errs[n] = {k: (got[k].double() - ref64[k].double()).abs() for k in ref64}
    if env.rank == 0:
        for k in errs[1]:
            worst = [errs[n][k].max().item() for n in (1, 2, 4)]
            mean = [errs[n][k].mean().item() for n in (1, 2, 4)]
            assert max(worst) <= 1.5 * min(worst), f"{k}: max error vs float64 for N = 1, 2, 4: {worst}"
            assert max(mean) <= 1.05 * min(mean), f"{k}: mean error vs float64 for N = 1, 2, 4: {mean}"


def case_saved_bytes(env):
    """Each rank saves for backward exactly its shards of q, k, v, out, what rounding out dropped (out_lo, for the
    backward's D: README, Numerics) and the LSE (fp32 for fp16 inputs): 1/N of N = 1's."""
    B, H, Hkv, L, D = 1, 4, 2, 64, 16
    qkv, do = _inputs(B, H, Hkv, L, D, 6, env.device)
    saved = {}
    for n in (1, 2, 4):
        if env.rank >= n:
            continue
        group = env.groups[f"first{n}"]
        shards = [shard(t.half(), group).requires_grad_() for t in qkv]
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = context_parallel_attention(*shards, group, causal=True)
        Ll = L // n
        expected = 2 * (3 * B * H * Ll * D + 2 * B * Hkv * Ll * D) + 4 * B * H * Ll  # q, out, out_lo, k, v; lse
        saved[n] = sum(seen.values())
        assert saved[n] == expected, f"N={n}: saved {saved[n]} bytes, expected {expected}"
        out.backward(shard(do.half(), group))
    if env.rank == 0:
        assert saved[1] == 2 * saved[2] == 4 * saved[4], saved


def case_comm_bytes(env):
    """Each rank sends exactly: forward, the K/V shards of every rank but its successor (N − 1 hops); backward,
    those again plus the fp32 dK/dV of every rank (N hops, the last one home). Uneven lengths, GQA, fp16."""
    B, H, Hkv, L, D, N, r = 1, 4, 2, 37, 8, env.world, env.rank
    qkv, do = _inputs(B, H, Hkv, L, D, 4, env.device)
    shards = [shard(t.half()).requires_grad_() for t in qkv]
    kv_bytes = [2 * B * Hkv * n * D * 2 for n in fd.shard_lengths(L, N)]
    fd.comm_stats(reset=True)
    out = context_parallel_attention(*shards, causal=True)
    assert fd.comm_stats(reset=True) == {"bytes": sum(kv_bytes) - kv_bytes[(r + 1) % N], "messages": N - 1}
    out.backward(shard(do.half()))
    assert fd.comm_stats(reset=True) == {"bytes": sum(kv_bytes) - kv_bytes[(r + 1) % N] + 2 * sum(kv_bytes),
                                         "messages": 2 * N - 1}


def case_comm_bytes_window(env):
    """A causal window shorter than a shard, contiguous layout: the ring stops after one step. Each rank sends its
    K/V shard once forward; backward, once more, plus dK/dV twice (its own shard's part to the next rank, and the
    previous rank's, complete, home). The result matches the single-process one (case_matches_single's cases)."""
    B, H, Hkv, L, D, N, r = 1, 2, 1, 40, 8, env.world, env.rank
    qkv, do = _inputs(B, H, Hkv, L, D, 5, env.device)
    shards = [shard(t.half(), layout="contiguous").requires_grad_() for t in qkv]
    kv_bytes = [2 * B * Hkv * n * D * 2 for n in fd.shard_lengths(L, N, "contiguous")]
    fd.comm_stats(reset=True)
    out = context_parallel_attention(*shards, causal=True, window_size=(L // N - 1, -1), layout="contiguous")
    assert fd.comm_stats(reset=True) == {"bytes": kv_bytes[r], "messages": 1}
    out.backward(shard(do.half(), layout="contiguous"))
    assert fd.comm_stats(reset=True) == {"bytes": kv_bytes[r] + 2 * kv_bytes[r] + 2 * kv_bytes[(r - 1) % N],
                                         "messages": 3}


def case_comm_bytes_window_both_ways(env):
    """A window reaching one shard both ways, contiguous layout, 4 ranks: one step of each ring. Each rank sends
    its K/V shard once each way; backward, as often again, plus dK/dV three times (its own shard's part to the
    next rank, and the neighbours' shards, complete, home). The result matches the reference (case_matches_single)."""
    B, H, Hkv, L, D, N, r = 1, 2, 1, 40, 8, env.world, env.rank
    qkv, do = _inputs(B, H, Hkv, L, D, 6, env.device)
    shards = [shard(t.half(), layout="contiguous").requires_grad_() for t in qkv]
    kv_bytes = [2 * B * Hkv * n * D * 2 for n in fd.shard_lengths(L, N, "contiguous")]
    fd.comm_stats(reset=True)
    out = context_parallel_attention(*shards, window_size=(L // N - 1, L // N - 1), layout="contiguous")
    assert fd.comm_stats(reset=True) == {"bytes": 2 * kv_bytes[r], "messages": 2}
    out.backward(shard(do.half(), layout="contiguous"))
    dkv = 2 * (kv_bytes[r] + kv_bytes[(r - 1) % N] + kv_bytes[(r + 1) % N])  # fp32
    got = fd.comm_stats(reset=True)
    assert got == {"bytes": 2 * kv_bytes[r] + dkv, "messages": 5}, (got, kv_bytes)


def case_comm_bytes_ulysses(env):
    """Ulysses, 4 ranks, L a multiple of N: forward, q, k, v (one all-to-all) and the output (another) each send
    (N − 1)/N of their shard; backward, the output's gradient and q, k, v's, as much again."""
    B, H, Hkv, L, D, N = 1, 4, 4, 40, 8, env.world
    qkv, do = _inputs(B, H, Hkv, L, D, 7, env.device)
    shards = [shard(t.half()).requires_grad_() for t in qkv]
    piece = B * (H // N) * (L // N) * D * 2  # one head group of one shard, fp16
    fd.comm_stats(reset=True)
    out = context_parallel_attention(*shards, causal=True, strategy="ulysses")
    assert fd.comm_stats(reset=True) == {"bytes": 4 * (N - 1) * piece, "messages": 2 * (N - 1)}
    out.backward(shard(do.half()))
    assert fd.comm_stats(reset=True) == {"bytes": 4 * (N - 1) * piece, "messages": 2 * (N - 1)}


def case_pairs(env):
    """Two groups at once, of non-adjacent global ranks ([0, 2] and [1, 3]): ring neighbours are group ranks."""
    case_matches_single(env, dtype=torch.float32, causal=True, layout="zigzag", L=29, group="pair",
                        seed=10 + env.rank % 2)


def _module_case(env, make, call, seq_dim, causal, padding=None):
    """A module on this rank's shards (its attention over the world group) against the same module unsharded, single
    process: output, input gradient and every parameter gradient (summed over the ranks) under §5. ``padding``
    "bool" / "float": a key padding mask [B, L] of that kind (float: 0 and −inf), this rank's shard of it."""
    torch.manual_seed(1)
    module = make()
    shape = [2, 2, 32]
    shape[seq_dim] = 37
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    kpm = None
    if padding:  # key 0 kept: every causal row sees a key
        pad = torch.rand(2, 37, generator=g) < 0.3
        pad[1, 5:15], pad[:, 0] = True, False
        kpm = pad if padding == "bool" else torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
        kpm = kpm.to(env.device)
    cp = copy.deepcopy(module).to(env.device)
    cp_mha = cp.self_attn if hasattr(cp, "self_attn") else cp
    cp_mha.context_parallel_group = dist.group.WORLD
    xs = shard(x.to(env.device), dim=seq_dim).requires_grad_()
    y = call(cp, xs, None, causal, None if kpm is None else shard(kpm, dim=1))
    y.backward(shard(dy.to(env.device), dim=seq_dim))
    got = {"out": unshard(y.detach(), dim=seq_dim), "dx": unshard(xs.grad, dim=seq_dim)}
    for name, p in cp.named_parameters():
        dist.all_reduce(p.grad)  # each rank's gradient is that of its tokens' outputs
        got["d." + name] = p.grad
    if env.rank != 0:
        return
    L = shape[seq_dim]
    mask = torch.ones(L, L, dtype=torch.bool, device=env.device).triu(1) if causal else None  # True = ignore

    def run(dtype):
        m = copy.deepcopy(module).to(device=env.device, dtype=dtype)
        xx = x.to(device=env.device, dtype=dtype).requires_grad_()
        out = call(m, xx, mask, causal, None if kpm is None else kpm.to(dtype) if padding == "float" else kpm)
        out.backward(dy.to(device=env.device, dtype=dtype))
        return {"out": out.detach(), "dx": xx.grad, **{"d." + n: p.grad for n, p in m.named_parameters()}}
    _assert_rule(got, run(torch.float64), run(torch.float32))


def case_mha(env, *, causal, padding=None, **options):
    """fastattn.nn.MultiheadAttention(context_parallel_group=...) on (L, B, E) shards (sequence first);
    ``options``: its window_size / alibi."""
    def call(m, x, mask, causal, kpm):
        return m(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal, key_padding_mask=kpm)[0]
    _module_case(env, lambda: fastattn.nn.MultiheadAttention(32, 4, **options), call, 0, causal, padding)


def case_encoder_layer(env, *, causal, padding=None):
    """fastattn.nn.TransformerEncoderLayer (batch_first) with its self-attention over the group (README example)."""
    def make():
        return fastattn.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)

    def call(m, x, mask, causal, kpm):
        return m(x, src_mask=mask, is_causal=causal, src_key_padding_mask=kpm)
    _module_case(env, make, call, 1, causal, padding)


def case_compiled(env):
    """A context-parallel module under torch.compile: the ring runs eagerly (a graph break at
    context_parallel_attention), the projections in the graph; output and input gradient as eager."""
    torch.manual_seed(3)
    mha = fastattn.nn.MultiheadAttention(32, 4, batch_first=True, context_parallel_group=dist.group.WORLD)
    mha = mha.to(env.device)
    x = shard(torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(4)).to(env.device), dim=1)

    def step(fn):
        xs = x.clone().requires_grad_()
        y = fn(xs)
        y.backward(torch.ones_like(y))
        return y.detach(), xs.grad

    def f(t):
        return mha(t, t, t, need_weights=False, is_causal=True)[0]
    for got, want in zip(step(torch.compile(f, backend="aot_eager")), step(f)):
        torch.testing.assert_close(got, want)


def case_mha_errors(env):
    """Masks other than causal and key padding, and need_weights, get clear errors (raised before any
    communication)."""
    mha = fastattn.nn.MultiheadAttention(16, 2, dropout=0.1, context_parallel_group=dist.group.WORLD).to(env.device)
    x = torch.randn(5, 2, 16, device=env.device)
    with pytest.raises(ValueError, match="need_weights"):
        mha(x, x, x)
    with pytest.raises(ValueError, match="attn_mask must be None"):
        mha(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.bool, device=env.device))
    bias = torch.zeros(2, 5, device=env.device)
    bias[1, 2] = -1.0
    with pytest.raises(ValueError, match="only 0 .attend. and -inf"):
        mha(x, x, x, need_weights=False, key_padding_mask=bias)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating-point"):
        mha(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 5, dtype=torch.int32, device=env.device))
    with pytest.raises(ValueError, match=r"key_padding_mask must be this rank's shard \(B, L_local\)=\(2, 5\)"):
        mha(x, x, x, need_weights=False, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool, device=env.device))
    assert mha.train()(x, x, x, need_weights=False)[0].shape == x.shape  # dropout (case_matches_single checks it)
    # One rank's own bad argument (only its call has an attn_mask): it raises that error, the others say which rank
    # failed, nobody waits for it in the exchange of shapes (it once left them waiting till the group's timeout)
    last = env.rank == env.world - 1
    mask = torch.zeros(5, 5, dtype=torch.bool, device=env.device) if last else None
    with pytest.raises(ValueError if last else RuntimeError,
                       match="attn_mask must be None" if last else rf"rank\(s\) \[{env.world - 1}\]"):
        mha.eval()(x, x, x, need_weights=False, attn_mask=mask)
    # A key padding mask on one rank only: every rank raises the same error
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=env.device) if last else None
    with pytest.raises(ValueError, match=r"different key_padding_mask \(given or not\)"):
        mha.eval()(x, x, x, need_weights=False, key_padding_mask=kpm)
    mha.eval()(x, x, x, need_weights=False)  # the group is still in step


def _shards(env, L=20, D=16, Hkv=2, dtype=torch.float32):
    qkv, _ = _inputs(1, 2, Hkv, L, D, 0, env.device)
    return [shard(t.to(dtype)) for t in qkv]


def case_errors(env):
    """Bad input raises the same clear error on every rank (the checks run on all ranks' gathered shapes)."""
    r = env.rank
    with pytest.raises(ValueError, match=r"head dims: \[16, 8\]"):
        context_parallel_attention(*_shards(env, D=16 if r == 0 else 8))
    with pytest.raises(ValueError if r == 0 else RuntimeError, match=r"sinks must have shape" if r == 0
                       else r"rank\(s\) \[0\]"):
        context_parallel_attention(*_shards(env), sinks=torch.zeros(3 if r == 0 else 2, device=env.device))
    with pytest.raises(ValueError, match="different sinks"):
        context_parallel_attention(*_shards(env), sinks=torch.zeros(2, device=env.device) if r == 0 else None)
    q, k, v = _shards(env)
    if r == 0:  # rank 0 passes the whole sequence instead of its shard
        q, k, v = (torch.cat([t, t], 2) for t in (q, k, v))
    with pytest.raises(ValueError, match="not sharded with this group and layout"):
        context_parallel_attention(q, k, v)
    q, k, v = _shards(env)
    with pytest.raises(ValueError, match="same positions"):
        context_parallel_attention(q, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2))
    with pytest.raises(ValueError, match="dtypes"):
        context_parallel_attention(*_shards(env, dtype=torch.float32 if r == 0 else torch.float16))
    with pytest.raises(ValueError, match="causal flags"):
        context_parallel_attention(*_shards(env), causal=r == 0)
    with pytest.raises(ValueError, match="multiple of k/v's 3 heads"):
        context_parallel_attention(*_shards(env, Hkv=3))
    with pytest.raises(ValueError, match=r"different dropout probabilities: \[0.1, 0.0\]"):
        context_parallel_attention(*_shards(env), dropout_p=0.1 if r == 0 else 0.0)
    with pytest.raises(ValueError, match=r"different ALiBi slopes \(values' CRC-32; −1: none\): \[\d+, -1\]"):
        context_parallel_attention(*_shards(env), alibi_slopes=fastattn.alibi_slopes(2) if r == 0 else None)
    with pytest.raises(ValueError, match=r"different ALiBi slopes"):
        context_parallel_attention(*_shards(env), alibi_slopes=fastattn.alibi_slopes(2) * (1 + r))
    with pytest.raises(ValueError, match=r"cu_seqlens must hold positions >= 0"):
        context_parallel_attention(*_shards(env), cu_seqlens=[0, -3, 20])
    # a window bound past every length is unbounded (it once overflowed the int64 exchange of options)
    torch.testing.assert_close(context_parallel_attention(*_shards(env), causal=True, window_size=(1 << 70, 0)),
                               context_parallel_attention(*_shards(env), causal=True), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"different cu_seqlens \(values' CRC-32\)"):
        context_parallel_attention(*_shards(env), cu_seqlens=[0, 10 + r, 20])
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to the sequence length 20"):
        context_parallel_attention(*_shards(env), cu_seqlens=[0, 10, 21])
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-d int32/int64 tensor"):
        context_parallel_attention(*_shards(env), cu_seqlens=torch.tensor([0.0, 20.0]))
    kv = torch.tensor([7 + r], dtype=torch.int32, device=env.device)
    with pytest.raises(ValueError, match=r"different kv_lens \(values' CRC-32\)"):
        context_parallel_attention(*_shards(env), kv_lens=kv)
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, L=20\], got values in \[21, 21\]"):
        context_parallel_attention(*_shards(env), kv_lens=torch.tensor([21], device=env.device))
    with pytest.raises(ValueError, match=r"kv_lens must have shape \(B,\)=\(1,\)"):
        context_parallel_attention(*_shards(env), kv_lens=torch.tensor([3, 4], device=env.device))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        context_parallel_attention(*_shards(env), alibi_slopes=fastattn.alibi_slopes(3))
    with pytest.raises(NotImplementedError, match="strategy='ulysses' does not take dropout"):
        context_parallel_attention(*_shards(env), dropout_p=0.1, strategy="ulysses")
    with pytest.raises(ValueError, match=r"different strategies: \[0, 1"):
        context_parallel_attention(*_shards(env), strategy="ring" if r == 0 else "ulysses")
    with pytest.raises(ValueError, match="strategy must be one of"):
        context_parallel_attention(*_shards(env), strategy="tree")
    with pytest.raises(ValueError, match=r"different return_lse flags: \[1, 0"):
        context_parallel_attention(*_shards(env), strategy="ulysses", return_lse=r == 0)
    with pytest.raises(ValueError, match=r"different backends \(0 torch, 1 triton, 2 cuda\): \[0, 1"):
        context_parallel_attention(*_shards(env), strategy="ulysses", backend="torch" if r == 0 else "triton")
    with pytest.raises(NotImplementedError, match="takes no key_padding_mask: use strategy='ring'"):
        context_parallel_attention(*_shards(env), strategy="ulysses", cu_seqlens=[0, 9, 20],
                                   key_padding_mask=torch.zeros(1, _shards(env)[0].shape[2], dtype=torch.bool,
                                                                device=env.device))
    q = _shards(env)[0]
    kpm = torch.zeros(1, q.shape[2], dtype=torch.bool, device=env.device)
    with pytest.raises(ValueError, match=r"different key_padding_mask \(given or not\): \[1, 0"):
        context_parallel_attention(*_shards(env), key_padding_mask=kpm if r == 0 else None)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor \(B, L_local\)"):
        context_parallel_attention(*_shards(env), key_padding_mask=kpm.float())
    with pytest.raises(ValueError, match=r"key_padding_mask must be this rank's shard \(B, L_local\)"):
        context_parallel_attention(*_shards(env), key_padding_mask=kpm[:, 1:])
    with pytest.raises(ValueError, match="agree in every dim but dim 2"):
        unshard(torch.zeros(2, 3 + r, 5, device=env.device))
    with pytest.raises(ValueError, match="not sharded with this group"):
        unshard(torch.zeros(2, 3, 7 if r == 0 else 3, device=env.device))
    # One rank's own argument error: it raises that error, the others say which rank failed (nobody waits on it)
    with pytest.raises(ValueError if r == 0 else RuntimeError, match="dropout_p" if r == 0 else r"rank\(s\) \[0\]"):
        context_parallel_attention(*_shards(env), dropout_p=1.5 if r == 0 else 0.0)
    with pytest.raises(ValueError if r == 1 else RuntimeError, match="layout" if r == 1 else r"rank\(s\) \[1\]"):
        context_parallel_attention(*_shards(env), layout="zigzag" if r == 0 else "spiral")
    with pytest.raises(ValueError, match="different scales"):
        context_parallel_attention(*_shards(env), scale=0.5 if r == 0 else None)
    with pytest.raises(ValueError, match=r"different windows \(left\): \[4, 3\]"):
        context_parallel_attention(*_shards(env), causal=True, window_size=(4 - r, -1))
    with pytest.raises(ValueError, match=r"different windows \(right; causal: 0\): \[-1, 1\]"):
        context_parallel_attention(*_shards(env), window_size=(-1, 2 * r - 1))
    with pytest.raises(ValueError, match=r"different softcaps: \[30.0, 0.0\]"):
        context_parallel_attention(*_shards(env), softcap=30.0 if r == 0 else 0.0)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        context_parallel_attention(*_shards(env), window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap must be a finite float"):
        context_parallel_attention(*_shards(env), softcap=-1.0)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        context_parallel_attention(*_shards(env), scale=float("nan"))
    with pytest.raises(ValueError, match="different grad modes"):
        context_parallel_attention(*[t.requires_grad_(r == 0) for t in _shards(env)])
    with pytest.raises(ValueError, match="different dtypes"):
        unshard(torch.zeros(2, 3, 5, device=env.device, dtype=torch.float32 if r == 0 else torch.float64))
    with pytest.raises(ValueError, match="different dims"):
        unshard(torch.zeros(2, 5, 5, device=env.device), dim=1 + r)
    q, k, v = (t.requires_grad_() for t in _shards(env))  # double backward: a clear error, not wrong numbers
    (g,) = torch.autograd.grad(context_parallel_attention(q, k, v).sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), q)
    q, k, v = _shards(env)  # a q that is no float tensor on one rank only: checked inside the guarded checks
    with pytest.raises(TypeError if r == 1 else RuntimeError, match="q" if r == 1 else r"rank\(s\) \[1\]"):
        context_parallel_attention(q.long() if r == 1 else q, k, v)
    context_parallel_attention(*_shards(env))  # the group is still in step after the errors


def case_ulysses_edges(env):
    """Ulysses: k/v that need no gradient on some ranks only, and an LSE in one rank's loss only, still take every
    rank through the same all-to-alls (one autograd node each way; dq as when all need one); L = 0 and B = 0 with
    documents give empty results."""
    qkv, do = _inputs(2, 4, 2, 29, 8, 11, env.device)
    grads = []
    for partial in (False, True):
        q, k, v = (shard(t) for t in qkv)
        q.requires_grad_()
        if not (partial and env.rank == 1):
            k.requires_grad_(), v.requires_grad_()
        out, lse = context_parallel_attention(q, k, v, causal=True, strategy="ulysses", return_lse=True)
        loss = (out * shard(do)).sum() + (lse.sum() * 0.5 if partial and env.rank == 0 else 0.0)
        loss.backward()
        grads.append(q.grad)
    if env.rank == 0:  # the LSE term of its loss changes its rows' dq (and only theirs)
        assert not torch.allclose(grads[1], grads[0])
    else:
        torch.testing.assert_close(grads[1], grads[0])
    for B, L, docs in ((2, 0, None), (0, 13, [0, 5, 13])):
        q, k, v = (shard(t).requires_grad_() for t in _inputs(B, 4, 2, L, 8, 0, env.device)[0])
        out = context_parallel_attention(q, k, v, causal=True, strategy="ulysses", cu_seqlens=docs)
        assert out.shape == q.shape
        assert all(g.shape == t.shape for g, t in zip(torch.autograd.grad(out.sum(), (q, k, v)), (q, k, v)))


def case_empty_batch(env, backend):
    """B = 0: empty outputs and gradients on every block backend (the Triton blocks once divided by zero)."""
    q, k, v = (shard(t).requires_grad_() for t in _inputs(0, 2, 1, 13, 8, 0, env.device)[0])
    out = context_parallel_attention(q, k, v, causal=True, backend=backend)
    assert out.shape == q.shape
    assert all(g.shape == t.shape for g, t in zip(torch.autograd.grad(out.sum(), (q, k, v)), (q, k, v)))


def case_layout_mismatch(env):
    """Contiguous shards of a length-13 sequence over 4 ranks ([4, 3, 3, 3]) passed as zigzag ([3, 3, 3, 4])."""
    qkv, _ = _inputs(1, 2, 2, 13, 8, 0, env.device)
    with pytest.raises(ValueError, match="not sharded with this group and layout"):
        context_parallel_attention(*[shard(t, layout="contiguous") for t in qkv], layout="zigzag")


def _match(world, backend="auto", dtypes=(torch.float32, torch.float16)):
    cases = {}
    for layout in fd.LAYOUTS:
        for causal in (True, False):
            for dtype in dtypes:
                name = f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-gqa-L37"
                cases[name] = (case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend,
                                                         seed=len(cases)))
    for dtype in dtypes:
        cases[f"{backend}-zigzag-causal-{str(dtype)[6:]}-gqa-L37-sinks"] = (
            case_matches_single, dict(dtype=dtype, causal=True, layout="zigzag", backend=backend, sinks=True,
                                      seed=50 + len(cases)))
    # Windows (a causal local one shorter than a shard, a band, a right-only one) and a logit cap, both layouts.
    # (15, 0) contiguous: the ring stops after step 1 (N = 2) or 2 (N = 4, shards of 9-10), before N − 1.
    for layout, causal, window, softcap, dtype in (("contiguous", True, (5, 0), 0.0, torch.float32),
                                                   ("contiguous", True, (15, 0), 0.0, dtypes[-1]),
                                                   ("zigzag", True, (7, 0), 2.0, dtypes[-1]),
                                                   ("zigzag", False, (4, 3), 0.0, dtypes[-1]),
                                                   ("contiguous", False, (-1, 4), 2.0, torch.float32),
                                                   # both ways, shorter than a shard: with 4 ranks both rings
                                                   ("contiguous", False, (5, 5), 0.0, dtypes[-1]),
                                                   ("contiguous", False, (8, 2), 2.0, torch.float32),
                                                   # two shards right: with 4 ranks two backward steps
                                                   ("contiguous", False, (0, 15), 0.0, torch.float32)):
        name = f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-window{window[0]},{window[1]}"
        cases[name + (f"-softcap{softcap:g}" if softcap else "")] = (case_matches_single, dict(
            dtype=dtype, causal=causal, layout=layout, backend=backend, window_size=window, softcap=softcap,
            seed=70 + len(cases)))
    cases[f"{backend}-contiguous-causal-{str(dtypes[-1])[6:]}-window6,0-softcap2-sinks"] = (case_matches_single, dict(
        dtype=dtypes[-1], causal=True, layout="contiguous", backend=backend, window_size=(6, 0), softcap=2.0,
        sinks=True, seed=90))
    # Documents (cu_seqlens; one of length 1), alone and with causal, a window, dropout and ALiBi.
    docs = [0, 5, 6, 20, 37]
    for layout, causal, extra, dtype in (("zigzag", True, dict(), torch.float32),
                                         ("contiguous", False, dict(window_size=(4, 4)), dtypes[-1]),
                                         ("zigzag", False, dict(), dtypes[-1]),
                                         ("contiguous", True, dict(dropout_p=0.2, alibi=True), torch.float32)):
        name = "-".join(f"{n}{v}" if not isinstance(v, bool) else n for n, v in extra.items()).replace(" ", "")
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-docs{name and '-' + name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend, cu_seqlens=docs,
                                      seed=130 + len(cases), **extra))
    # Many documents (an empty one too) and masks of at most 30 pairs: blocks of one document and of several.
    for layout, causal, extra, dtype in (("zigzag", True, dict(dropout_p=0.2, alibi=True), torch.float32),
                                         ("contiguous", False, dict(window_size=(6, 3), lse=True), dtypes[-1])):
        name = "".join("-" + n for n in extra)
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-docs-split{name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend,
                                      cu_seqlens=_docs(37, many=True), doc_mask_elems=30, seed=210 + len(cases),
                                      **extra))
    # Dropout (the whole sequence's Philox mask) and ALiBi (in positions): merged blocks split per chunk pair.
    for layout, causal, extra, dtype in (("zigzag", True, dict(dropout_p=0.2), torch.float32),
                                         ("zigzag", True, dict(dropout_p=0.3), dtypes[-1]),
                                         ("contiguous", False, dict(alibi=True, window_size=(6, 6)), torch.float32),
                                         ("zigzag", True, dict(alibi=True, dropout_p=0.1), dtypes[-1]),
                                         ("zigzag", False, dict(alibi=True), dtypes[-1])):
        name = "-".join(f"{n}{v}" if not isinstance(v, bool) else n for n, v in extra.items()).replace(" ", "")
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-{name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend,
                                      seed=110 + len(cases), **extra))
    # Right padding of the keys (kv_lens, global positions; a batch entry with none valid), with causal, a window
    # and the LSE.
    for layout, causal, extra, dtype in (("zigzag", True, dict(kv_lens=[37, 20]), torch.float32),
                                         ("contiguous", False, dict(kv_lens=[0, 29], lse=True), dtypes[-1]),
                                         ("zigzag", True, dict(kv_lens=[11, 30], window_size=(6, 0)), dtypes[-1])):
        name = "-".join(n for n in extra)
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-{name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend,
                                      seed=170 + len(cases), **extra))
    # A key padding mask (padding anywhere; left padding leaves a causal row's first rows without keys): alone,
    # with documents and a window (one mask of both), with kv_lens, dropout and the LSE.
    for layout, causal, extra, dtype in (("zigzag", True, dict(), torch.float32),
                                         ("contiguous", False, dict(cu_seqlens=docs, window_size=(6, 6)), dtypes[-1]),
                                         ("zigzag", True, dict(kv_lens=[30, 37], dropout_p=0.2, lse=True),
                                          dtypes[-1])):
        name = "".join("-" + n for n in extra)
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-key_padding_mask{name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend,
                                      key_padding_mask=True, seed=190 + len(cases), **extra))
    # The LSE returned and differentiated, with sinks, a window and documents.
    for layout, causal, extra, dtype in (("zigzag", True, dict(sinks=True), torch.float32),
                                         ("contiguous", False, dict(window_size=(5, 5), cu_seqlens=docs), dtypes[-1])):
        name = "-".join(n for n in extra)
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-lse-{name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend, lse=True,
                                      seed=150 + len(cases), **extra))
    cases[f"{backend}-zigzag-causal-float32-mha-L32-scale"] = (
        case_matches_single, dict(dtype=torch.float32, causal=True, layout="zigzag", H=2, Hkv=2, L=32, scale=0.3,
                                  backend=backend, seed=99))
    # strategy="ulysses": all-to-alls and one fastattn.attention call (H = 4, Hkv = 2: with N = 4 the K/V heads are
    # repeated), with the features it takes.
    for layout, causal, extra, dtype in (("zigzag", True, dict(), torch.float32),
                                         ("contiguous", False, dict(window_size=(5, 3), alibi=True, softcap=2.0,
                                                                    sinks=True, lse=True), dtypes[-1]),
                                         ("zigzag", True, dict(cu_seqlens=docs, lse=True, alibi="batch"),
                                          torch.float32),
                                         # keys cut at kv_lens inside documents (one batch entry's last document
                                         # has none, a row without keys)
                                         ("contiguous", False, dict(cu_seqlens=docs, kv_lens=[12, 33],
                                                                    window_size=(6, 2)), dtypes[-1]),
                                         ("zigzag", True, dict(kv_lens=[30, 37], key_padding_mask=True), dtypes[-1])):
        name = "".join("-" + n for n in extra)
        cases[f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-ulysses{name}"] = (
            case_matches_single, dict(dtype=dtype, causal=causal, layout=layout, backend=backend, strategy="ulysses",
                                      seed=230 + len(cases), **extra))
    # A sequence shorter than the chunks: some chunks, and with N = 4 a whole shard, are empty.
    cases[f"{backend}-zigzag-causal-float32-L{world - 1}"] = (
        case_matches_single, dict(dtype=torch.float32, causal=True, layout="zigzag", L=world - 1, backend=backend))
    cases[f"{backend}-zigzag-causal-float32-L{world - 1}-ulysses"] = (
        case_matches_single, dict(dtype=torch.float32, causal=True, layout="zigzag", L=world - 1, backend=backend,
                                  strategy="ulysses"))
    return cases


MODULES = {"mha-seq-first-causal": (case_mha, dict(causal=True)), "mha-seq-first-full": (case_mha, dict(causal=False)),
           "mha-window-alibi": (case_mha, dict(causal=True, window_size=(5, 0), alibi=True)),
           "encoder-layer-causal": (case_encoder_layer, dict(causal=True)),
           "encoder-layer-full": (case_encoder_layer, dict(causal=False)), "mha-errors": (case_mha_errors, {}),
           "compiled": (case_compiled, {}),
           "mha-causal-key-padding": (case_mha, dict(causal=True, padding="bool")),
           "mha-ulysses-window-alibi-key-padding": (case_mha, dict(causal=True, padding="bool", window_size=(5, 0),
                                                                   alibi=True, context_parallel_strategy="ulysses")),
           "encoder-layer-key-padding-float": (case_encoder_layer, dict(causal=False, padding="float"))}

SUITES = {
    2: {**_match(2), "shard-roundtrip": (case_shard_roundtrip, {}), **MODULES, "errors": (case_errors, {}),
        # The Triton kernels (under the interpreter on CPU) as the blocks of the ring: the path GPUs take.
        "triton-zigzag-causal-float16-gqa": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=45, backend="triton", seed=7)),
        "triton-contiguous-full-float32": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=1, H=2, Hkv=2, L=37, backend="triton",
            seed=8)),
        "triton-zigzag-causal-float16-sinks": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=45, backend="triton", seed=10,
            sinks=True)),
        "triton-contiguous-causal-float16-window5-softcap2": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="contiguous", B=1, H=2, Hkv=1, L=45, backend="triton", seed=12,
            window_size=(5, 0), softcap=2.0)),
        "triton-zigzag-full-float32-window4,3": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="zigzag", B=1, H=2, Hkv=2, L=37, backend="triton", seed=13,
            window_size=(4, 3))),
        "triton-zigzag-causal-float16-dropout-alibi-window9": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=45, backend="triton", seed=14,
            dropout_p=0.2, alibi=True, window_size=(9, 0))),
        "triton-contiguous-full-float32-dropout": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=1, H=2, Hkv=2, L=37, backend="triton", seed=15,
            dropout_p=0.25)),
        "triton-zigzag-causal-float16-docs": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=45, backend="triton", seed=17,
            cu_seqlens=torch.tensor([0, 13, 14, 30, 45]))),
        "triton-contiguous-full-float32-docs-window5,5": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=1, H=2, Hkv=2, L=37, backend="triton", seed=18,
            cu_seqlens=[0, 9, 10, 23, 37], window_size=(5, 5))),
        "triton-zigzag-causal-float16-lse-sinks-docs": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=45, backend="triton", seed=19,
            lse=True, sinks=True, cu_seqlens=[0, 20, 45])),
        "triton-contiguous-full-float32-lse": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=1, H=2, Hkv=2, L=37, backend="triton", seed=20,
            lse=True)),
        "triton-zigzag-causal-float16-kv_lens": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=2, H=2, Hkv=1, L=45, backend="triton", seed=21,
            kv_lens=[45, 17])),
        "triton-contiguous-full-float32-kv_lens-window": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=2, H=2, Hkv=2, L=37, backend="triton",
            seed=22, kv_lens=[0, 25], window_size=(4, 6))),
        "triton-zigzag-causal-float16-key_padding_mask": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=2, H=2, Hkv=1, L=45, backend="triton", seed=23,
            key_padding_mask=True)),
        "triton-contiguous-full-float32-key_padding_mask-docs-dropout": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=2, H=2, Hkv=2, L=37, backend="triton",
            seed=24, key_padding_mask=True, cu_seqlens=[0, 9, 10, 23, 37], dropout_p=0.2)),
        "triton-zigzag-causal-float16-docs-split-key_padding_mask": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=2, H=2, Hkv=1, L=45, backend="triton", seed=25,
            cu_seqlens=_docs(45, many=True), doc_mask_elems=30, key_padding_mask=True)),
        "triton-zigzag-causal-float16-ulysses-window-lse": (case_matches_single, dict(
            dtype=torch.float16, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=45, backend="triton", seed=28,
            strategy="ulysses", window_size=(9, 0), lse=True)),
        "triton-contiguous-full-float32-sinks": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=1, H=2, Hkv=2, L=37, backend="triton",
            seed=11, sinks=True)),
        "ulysses-edges": (case_ulysses_edges, {}),
        "empty-batch-triton": (case_empty_batch, dict(backend="triton")),
        "empty-batch-torch": (case_empty_batch, dict(backend="torch"))},
    4: {**_match(4), "shard-roundtrip": (case_shard_roundtrip, {}), "error-vs-ranks": (case_error_vs_ranks, {}),
        "saved-bytes": (case_saved_bytes, {}), "comm-bytes": (case_comm_bytes, {}),
        "comm-bytes-window": (case_comm_bytes_window, {}),
        "comm-bytes-window-both-ways": (case_comm_bytes_window_both_ways, {}),
        "comm-bytes-ulysses": (case_comm_bytes_ulysses, {}),
        "ulysses-H8-Hkv2": (case_matches_single, dict(  # K/V heads repeated to lcm(2, 4) = 4, not H = 8
            dtype=torch.float32, causal=True, layout="zigzag", B=1, H=8, Hkv=2, L=33, strategy="ulysses", seed=31,
            window_size=(7, 0), lse=True)),
        "triton-contiguous-full-float16-window6,4-alibi-dropout-lse": (case_matches_single, dict(
            dtype=torch.float16, causal=False, layout="contiguous", B=1, H=2, Hkv=1, L=45, backend="triton",
            seed=26, window_size=(6, 4), alibi=True, dropout_p=0.2, lse=True)),
        "triton-contiguous-full-float32-window5,5-docs-key_padding_mask": (case_matches_single, dict(
            dtype=torch.float32, causal=False, layout="contiguous", B=2, H=2, Hkv=2, L=37, backend="triton",
            seed=27, window_size=(5, 5), cu_seqlens=_docs(37, many=True), key_padding_mask=True)),
        "two-groups-of-two": (case_pairs, {}),
        "layout-mismatch": (case_layout_mismatch, {}),
        "triton-zigzag-causal-float32-gqa": (case_matches_single, dict(
            dtype=torch.float32, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=37, backend="triton", seed=9)),
        "triton-zigzag-causal-float32-dropout-alibi": (case_matches_single, dict(
            dtype=torch.float32, causal=True, layout="zigzag", B=1, H=2, Hkv=1, L=37, backend="triton", seed=16,
            dropout_p=0.15, alibi=True))},
}
# An odd N: windows that take the forward ring alone ((5, 5), and (0, 15), which reaches two shards right: two
# steps of either ring, the forward one on the tie) or the backward one alone ((0, 5): one step).
def case_ulysses_heads(env):
    """Ulysses needs the query heads to split evenly over the ranks: the same error on every rank."""
    with pytest.raises(ValueError, match=r"query heads \(2\) to be a multiple of the ranks \(3\)"):
        context_parallel_attention(*_shards(env), strategy="ulysses")


SUITES[3] = {"ulysses-heads": (case_ulysses_heads, {}), **{
    f"{backend}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-{name}": (case_matches_single, dict(
        dtype=dtype, causal=causal, layout=layout, backend=backend, seed=400 + i, **extra))
    for i, (backend, layout, causal, dtype, name, extra) in enumerate((
        ("auto", "zigzag", True, torch.float32, "gqa", {}),
        ("auto", "contiguous", False, torch.float16, "window5,5", dict(window_size=(5, 5))),
        ("auto", "contiguous", False, torch.float32, "window0,5", dict(window_size=(0, 5))),
        ("auto", "contiguous", False, torch.float32, "window0,15-alibi-dropout", dict(
            window_size=(0, 15), alibi=True, dropout_p=0.2)),
        ("auto", "zigzag", True, torch.float16, "docs-key_padding_mask", dict(
            cu_seqlens=_docs(37, many=True), key_padding_mask=True)),
        ("triton", "contiguous", False, torch.float16, "window0,15-lse", dict(
            window_size=(0, 15), lse=True, B=1, H=2, Hkv=1)),
        ("auto", "zigzag", True, torch.float32, "ulysses-H6", dict(strategy="ulysses", H=6, Hkv=3)),
    ))}}
# With NCCL on GPUs: backend "auto" is Triton there, bf16 as well; the same modules and errors.
SUITES["nccl"] = {**_match(2, dtypes=(torch.float32, torch.float16, torch.bfloat16)), **MODULES,
                  "errors": (case_errors, {})}

# Four processes sharing one GPU over gloo (transfers staged through host memory): the Triton blocks on a GPU, bf16
# included, and both rings, on a machine with one GPU.
SUITES["one-gpu"] = {
    f"{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-{name}": (case_matches_single, dict(
        dtype=dtype, causal=causal, layout=layout, B=2, H=4, Hkv=2, L=61, seed=300 + i, **extra))
    for i, (layout, causal, dtype, name, extra) in enumerate((
        ("zigzag", True, torch.bfloat16, "gqa", {}),
        ("contiguous", False, torch.float32, "plain", {}),
        ("contiguous", False, torch.float16, "window7,7", dict(window_size=(7, 7))),  # one step each way
        ("contiguous", False, torch.bfloat16, "window0,25", dict(window_size=(0, 25))),  # two steps backward
        ("zigzag", True, torch.bfloat16, "dropout-alibi-softcap", dict(dropout_p=0.2, alibi=True, softcap=5.0)),
        ("contiguous", True, torch.float16, "docs-split-key_padding_mask", dict(
            cu_seqlens=_docs(61, many=True), doc_mask_elems=30, key_padding_mask=True)),
        ("zigzag", True, torch.bfloat16, "lse-sinks-kv_lens", dict(lse=True, sinks=True, kv_lens=[61, 23])),
        ("zigzag", True, torch.bfloat16, "ulysses-window-sinks", dict(strategy="ulysses", window_size=(9, 0),
                                                                       sinks=True)),
    ))}


def _suite_worker(rank, world, suite, out_dir):
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" or suite == "one-gpu" else "cpu"
    groups = {"world": None}
    for n in (1, 2, 4):  # new_group is collective: every rank creates every group, in the same order
        if n <= world:
            groups[f"first{n}"] = dist.new_group(list(range(n)))
    if world == 4:
        pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        groups["pair"] = pairs[rank % 2]
    env = Env(rank, world, device, groups)
    results = {}
    for name, (fn, kw) in SUITES[suite].items():
        try:
            fn(env, **kw)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - recorded per case; the test of that case fails with the traceback
            results[name] = traceback.format_exc()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def _run_suite(tmp_path_factory, suite, world, backend="gloo", timeout=TIMEOUT):
    out = tmp_path_factory.mktemp(f"cp_{suite}_{world}")
    run_distributed(_suite_worker, world, suite, str(out), backend=backend, timeout=timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _check(results, name):
    failed = {r: res.get(name, "not run") for r, res in enumerate(results) if res.get(name) != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{msg}" for r, msg in failed.items())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run_suite(tmp_path_factory, 2, 2)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _run_suite(tmp_path_factory, 3, 3)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _run_suite(tmp_path_factory, 4, 4)


@pytest.mark.parametrize("name", list(SUITES[2]))
def test_two_ranks(two_ranks, name):
    _check(two_ranks, name)


@pytest.mark.parametrize("name", list(SUITES[3]))
def test_three_ranks(three_ranks, name):
    _check(three_ranks, name)


@pytest.mark.parametrize("name", list(SUITES[4]))
def test_four_ranks(four_ranks, name):
    _check(four_ranks, name)


@pytest.mark.gpu
def test_four_processes_on_one_gpu(tmp_path_factory):
    """The ring with Triton blocks on a GPU (bf16 too) where the machine has one GPU: four processes share it over
    gloo."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    results = _run_suite(tmp_path_factory, "one-gpu", 4, timeout=2 * TIMEOUT)  # (each process compiles its kernels)
    failed = [f"{name}: {[r for r, res in enumerate(results) if res.get(name) != 'ok']}\n{results[0].get(name)}"
              for name in SUITES["one-gpu"] if any(res.get(name) != "ok" for res in results)]
    assert not failed, "\n".join(failed)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_nccl(tmp_path_factory, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"NCCL context-parallel tests with {world} ranks need {world} GPUs, "
                    f"found {torch.cuda.device_count()}")
    results = _run_suite(tmp_path_factory, "nccl", world, backend="nccl")
    for name in SUITES["nccl"]:
        _check(results, name)


# ------------------------------------------------------------------------------------------- in this process
def _step_mask(N, L, layout, r, src, left, right):
    """Global positions of rank r's queries and src's keys, and where the global window lets key j meet query i."""
    q = torch.cat([torch.arange(s, s + n) for s, n in fd._rank_chunks(L, N, r, layout)])
    k = torch.cat([torch.arange(s, s + n) for s, n in fd._rank_chunks(L, N, src, layout)])
    rel = k[None, :] - q[:, None]
    return q, k, (rel >= -left if left >= 0 else True) & (rel <= right if right >= 0 else True) & (rel == rel)


WINDOWS = [(-1, 0), (-1, -1), (0, 0), (3, 0), (5, 2), (2, -1), (-1, 4), (0, 7), (9, 9), (40, 0)]


def _block_seen(qb, kb, wl, wr, shift):
    """Bool [qb, kb]: the pairs of a block that its window (wl, wr) in positions lets through, position j − i
    being index j − i − shift (shift = i0 − j0, as the kernels take it)."""
    rel = torch.arange(kb)[None, :] - torch.arange(qb)[:, None] - shift
    seen = torch.ones(qb, kb, dtype=torch.bool)
    if wr >= 0:
        seen &= rel <= wr
    if wl >= 0:
        seen &= rel >= -wl
    return seen


@pytest.mark.parametrize("mode", ["merged", "by-position", "docs", "docs-split"])
@pytest.mark.parametrize("layout", fd.LAYOUTS)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_plan_is_the_window_mask(layout, window, mode):
    """For every N, length (uneven, shorter than the chunks) and (rank, source) pair, the blocks of a ring step,
    each with its window taken from its diagonal shift i0 − j0 (0 for merged blocks), cover exactly the global
    window (causal: (−1, 0)), with no pair twice and no row or key of a block without a visible pair; the steps of
    the two rings (_ring_steps) reach every shard with a block, none twice. Unmerged blocks (ALiBi, dropout) are
    consecutive positions from (i0, j0).
    With documents (cu_seqlens) the pairs of the same document only, a block spanning several flagged (doc_mask)
    and rows and keys trimmed to the documents the other side holds; "docs-split": many documents and masks of at
    most 30 pairs, so blocks of one document (no mask) and of several.
    Causal: zigzag steps away from the diagonal are one full block of one chunk's length on either side (the
    balanced work); no window: one block."""
    left, right = window
    merge = mode == "merged"
    for N in range(1, 6):
        for L in list(range(0, 2 * N + 3)) + [37, 64]:
            chunks = [fd._rank_chunks(L, N, r, layout) for r in range(N)]
            docs = _docs(L, many=mode == "docs-split") if mode.startswith("docs") and L else None
            mask_elems = 30 if mode == "docs-split" else None
            TL, TR = fd._ring_steps(chunks, window, docs)
            assert TL + TR <= max(N - 1, 0)
            assert fd._needed_offsets(chunks, window, docs) == {  # its tensor form, against _plan one pair at a time
                d for d in range(1, N) if any(fd._plan(chunks[r], chunks[(r + d) % N], left, right, docs=docs)
                                              for r in range(N))}
            for r in range(N):
                for t in range(N):
                    src = (r - t) % N
                    q, k, want = _step_mask(N, L, layout, r, src, left, right)
                    if docs is not None:
                        doc = torch.searchsorted(torch.tensor(docs), torch.arange(L), right=True)
                        want = want & (doc[q][:, None] == doc[k][None, :])
                    got = torch.zeros(len(q), len(k), dtype=torch.int32)
                    blocks = fd._plan(chunks[r], chunks[src], left, right, merge=merge, docs=docs,
                                      mask_elems=mask_elems)
                    for qa, qb, ka, kb, wl, wr, i0, j0, doc_mask in blocks:
                        assert merge or (i0 is not None and torch.equal(q[qa:qb], i0 + torch.arange(qb - qa))
                                         and torch.equal(k[ka:kb], j0 + torch.arange(kb - ka))), blocks
                        seen = _block_seen(qb - qa, kb - ka, wl, wr, 0 if i0 is None else i0 - j0)
                        if docs is None:
                            assert not doc_mask
                            assert seen.any(dim=1).all() and seen.any(dim=0).all(), (blocks, "a row or key sees none")
                        else:
                            same = doc[q[qa:qb]][:, None] == doc[k[ka:kb]][None, :]
                            assert doc_mask == (not same.all()) and same.any(dim=1).all() and same.any(dim=0).all()
                            assert not doc_mask or (qb - qa) * (kb - ka) <= (mask_elems or fd._DOC_MASK_ELEMS)
                            seen &= same
                        got[qa:qb, ka:kb] += seen.int()
                    assert torch.equal(got, want.int()), (N, L, r, src, blocks)
                    assert not blocks or t <= TL or N - t <= TR  # forward ring's step t, or backward's N − t
                    if merge and window == (-1, 0) and layout == "zigzag" and src != r and L % (2 * N) == 0 and L:
                        assert len(blocks) == 1 and blocks[0][4:6] == (-1, -1) \
                            and (blocks[0][1] - blocks[0][0]) * (blocks[0][3] - blocks[0][2]) == len(q) * len(k) // 2
                    if merge and window == (-1, -1):
                        assert blocks == ([(0, len(q), 0, len(k), -1, -1, None, None, False)] if len(q) and len(k)
                                          else [])
            if layout == "contiguous" and window in ((3, 0), (0, 0)) and L >= 4 * N and docs is None:
                assert (TL, TR) == (0 if window == (0, 0) or N == 1 else 1, 0), (N, L, TL, TR)
            if layout == "contiguous" and window in ((5, 2), (0, 7), (9, 9)) and L >= 10 * N and docs is None:
                # one shard each way (N = 3: two steps forward, as few messages); right-only: one step backward
                want = (0, 0) if N == 1 else (1, 0) if N == 2 else (2, 0) if N == 3 and window != (0, 7) else \
                    (0, 1) if window == (0, 7) else (1, 1)
                assert (TL, TR) == want, (N, L, window, TL, TR)


def test_errors_without_process_group():
    q = torch.randn(1, 2, 4, 8)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard(q)
    with pytest.raises(ValueError, match="layout must be one of"):
        context_parallel_attention(q, q, q, layout="ring")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        context_parallel_attention(q, q, q, dropout_p=1.5)


def test_swapped_modules_have_no_group():
    """swap_modules re-classes torch's module without running __init__: the class default (None) applies."""
    m = fastattn.nn.swap_modules(torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2)))[0]
    assert type(m) is fastattn.nn.MultiheadAttention and m.context_parallel_group is None
    assert fastattn.nn.MultiheadAttention(8, 2).context_parallel_group is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fixed tiles (a GPU autotunes its tiles)")
def test_document_mask_skips_tiles():
    """A block's same-document mask costs no compute on the tiles it hides: a row block's documents are
    consecutive, so the hidden key tiles lie at either end of its range, which the kernels skip (forward: key
    tiles per query tile; backward: query tiles per key tile). Visited = tiles holding a same-document pair."""
    from fastattn.triton import attention as kernels
    L, T = 256, kernels.INTERPRET_BLOCK
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 1, L, 32, generator=g) for _ in range(4))
    docs = [0, 40, 90, 180, 256]
    doc = torch.searchsorted(torch.tensor(docs), torch.arange(L), right=True)
    mask = (doc[:, None] == doc[None, :])[None, None]
    tiles = mask[0, 0].reshape(L // T, T, L // T, T).any(3).any(1)  # [query tile, key tile] holds a pair
    count = {}
    out, lse = torch.empty(1, 1, L, 32), torch.empty(1, 1, L, dtype=torch.float64)
    kernels.forward(q, k, v, None, mask, None, out, lse, 0.2, False, False, count=count)
    assert count["fwd"][:L // T].tolist() == tiles.sum(1).tolist()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernels.backward(do, q, k, v, out, lse, None, None, mask, None, dq, dk, dv, None, 0.2, False, False, count=count)
    assert count["dkdv"][:L // T].tolist() == tiles.sum(0).tolist()
    assert count["dq"][:L // T].tolist() == tiles.sum(1).tolist()
    assert tiles.sum() < tiles.numel() // 2


@pytest.mark.parametrize("where", ["here", pytest.param("gpu", marks=pytest.mark.gpu)])  # gpu: in the gpu session
@pytest.mark.parametrize("layout", fd.LAYOUTS)
def test_blocks_at_their_origins_rebuild_one_process(layout, where):
    """In one process (no group): the ring's blocks of N = 3 virtual ranks, each run by the Triton kernels at its
    origin (window, ALiBi, softcap, dropout mask and documents in global positions) and merged, give the output and
    LSE of one fastattn.attention call on the whole sequence with the same seed: the kernels' origin path, which
    the `gpu` session exercises on a single GPU (the NCCL tests need several)."""
    from conftest import DEVICE
    B, H, Hkv, L, D, N, p = 2, 4, 2, 50, 16, 3, 0.2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(DEVICE) for h in (H, Hkv, Hkv))
    slopes = fastattn.alibi_slopes(H).to(DEVICE)
    docs = [0, 17, 18, 41, 50]
    kw = dict(causal=True, window_size=(12, 0), alibi_slopes=slopes, softcap=3.0, dropout_p=p)
    torch.manual_seed(5)
    seed = int(torch.randint(1 << 31, 1 << 62, (), dtype=torch.int64))
    doc_of = (torch.searchsorted(torch.tensor(docs), torch.arange(L), right=True) - 1).int().to(DEVICE)
    feat = fd._Features(3.0, slopes.reshape(1, H), p, seed, L, docs, doc_of)
    chunks = [fd._rank_chunks(L, N, r, layout) for r in range(N)]
    pos = [torch.cat([torch.arange(s, s + n) for s, n in chunks[r]]) for r in range(N)]
    out = torch.zeros(B, H, L, D, dtype=torch.float32, device=DEVICE)
    lse = torch.full((B, H, L), float("-inf"), dtype=torch.float64, device=DEVICE)
    for r in range(N):
        o_r = torch.zeros(B, H, len(pos[r]), D, dtype=torch.float32, device=DEVICE)
        l_r = torch.full((B, H, len(pos[r])), float("-inf"), dtype=torch.float64, device=DEVICE)
        for src in range(N):
            for qa, qb, ka, kb, *blk in fd._blocks(chunks[r], chunks[src], (12, 0), feat):
                qs, ks = pos[r][qa:qb].to(DEVICE), pos[src][ka:kb].to(DEVICE)
                o, l2 = fd._triton_block_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], D ** -0.5, blk, feat,
                                                 torch.float32)
                fd._merge(o_r[:, :, qa:qb], l_r[:, :, qa:qb], o, l2)
        out[:, :, pos[r].to(DEVICE)], lse[:, :, pos[r].to(DEVICE)] = o_r, l_r
    torch.manual_seed(5)
    doc = doc_of.long()
    want, want_lse = fastattn.attention(q, k, v, attn_bias=doc[:, None] == doc[None, :], return_lse=True,
                                        backend="triton", **kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    lse = torch.where(torch.isinf(lse), float("inf"), lse)  # the op's convention for a row without keys
    torch.testing.assert_close((lse * math.log(2.0)).float(), want_lse, atol=2e-5, rtol=2e-5)


def test_sink_gradient_leaves_a_float64_output_alone():
    """The sinks' row gradient (the ring's backward calls it on the output it returned) once multiplied a float64
    output by do in place (.double() of fp64 is the tensor itself)."""
    from fastattn.ops.attention import _sink_row_grad
    g = torch.Generator().manual_seed(0)
    out, do = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    kept = out.clone()
    _sink_row_grad(do, out, None, torch.randn(1, 2, 5, generator=g, dtype=torch.float64), None,
                   torch.randn(2, generator=g, dtype=torch.float64))
    assert torch.equal(out, kept)
