"""Context-parallel ring attention (fastattn.distributed): step time, per-rank memory and bytes sent for N = 1, 2, 4
processes on this machine, beside the model of the communication volume.

One spawn of 4 processes; groups of the first N ranks run in turn (the others wait at a barrier). On the CPU the
group is gloo (each rank uses cores / N torch threads); on a machine with at least 4 GPUs NCCL with one GPU per
rank; with fewer GPUs the processes share GPU 0 over gloo, which stages every transfer through host memory (the
step times then include those copies: a correctness-and-memory run, not a network benchmark).
Each rank runs context_parallel_attention forward + backward (causal, zigzag) on its shard of one global problem
(further tables: a causal window, a window both ways (the second ring), strategy="ulysses", packed documents):
  step   median ms of forward + backward on rank 0, a fixed number of calls after warm-up, each between barriers
  peak   (CUDA only) max over ranks of torch.cuda.max_memory_allocated() during a step minus the memory before
  saved  bytes autograd saves for backward on a rank (saved_tensors_hooks): its shards of q, k, v, out and the LSE
  sent   bytes a rank sent through the ring's point-to-point operations in one forward and one backward
         (fastattn.distributed.comm_stats, counted in its send wrapper)
Model, |KV| = bytes of the whole sequence's K and V: the forward sends its K/V shard N − 1 times, 2·(N−1)/N of |K|
(= (N−1)/N·|KV|); the backward sends K/V as often again plus dK/dV, "twice that" in the issue's model. Exactly,
this implementation's dK/dV travel in fp32 (nothing rounded between steps) and make N hops (the last brings them
home): backward = (N−1)/N·|KV| + |KV|·4/element size.

    python benchmarks/bench_context_parallel.py [--quick | --full] [--out DIR]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402

import common  # noqa: E402

NAME = "context_parallel"
WORLD = 4
RANKS = (1, 2, 4)
MiB = 1 << 20


def problem(mode: str, gpu: bool) -> dict:
    if gpu:
        L = {"quick": 16384, "default": 65536, "full": 131072}[mode]
        return dict(B=1, H=16, Hkv=16, L=L, D=128, dtype="bfloat16")
    L = {"quick": 512, "default": 2048, "full": 4096}[mode]
    return dict(B=1, H=4, Hkv=4, L=L, D=64, dtype="float32")


def _model(p: dict, N: int) -> dict:
    """Bytes one rank sends per step according to the model (issue) and exactly (this implementation)."""
    esize = torch.empty(0, dtype=getattr(torch, p["dtype"])).element_size()
    kv = 2 * p["B"] * p["Hkv"] * p["L"] * p["D"] * esize  # |KV| of the whole sequence
    fwd = (N - 1) * kv // N
    # a window shorter than a shard (contiguous): the ring stops after one step; dK/dV make two hops
    win = kv // N if N > 1 else 0
    # a window shorter than a shard both ways: TL steps of the forward ring and TR of the backward one; dK/dV make
    # TL + 1 hops (the last straight home) and TR
    from fastattn import distributed as fd
    TL, TR = fd._ring_steps([fd._rank_chunks(p["L"], N, r, "contiguous") for r in range(N)], (window(p), window(p)))
    hops = (TL + 1 if TL else 0) + TR
    return {"model_fwd": fwd, "model_bwd": 2 * fwd, "exact_bwd": fwd + (kv * 4 // esize if N > 1 else 0),
            "model_fwd_win": win, "model_bwd_win": win + 2 * win * 4 // esize,
            "model_fwd_both": (TL + TR) * kv // N, "model_bwd_both": (TL + TR) * kv // N + hops * kv // N * 4 // esize,
            # Ulysses: q, k, v and the output (backward: their gradients) each send (N − 1)/N of their shard
            "model_uly": (N - 1) * (kv + 2 * p["B"] * p["H"] * p["L"] * p["D"] * esize) // N // N}


def documents(p: dict) -> list[int]:
    """The packed documents of the document rows (cu_seqlens): 5 of unequal lengths, 3/16 to 4/16 of L, whose
    boundaries fall inside the shards' chunks."""
    return [p["L"] * d // 16 for d in (0, 3, 7, 9, 13, 16)]


def window(p: dict) -> int:
    """The sliding window of the windowed rows: L/8 keys back, shorter than every shard for N <= 4."""
    return p["L"] // 8


def _measure(group, full, device, warmup, reps, kw) -> dict:
    """Step time, saved bytes, bytes sent and peak memory of context_parallel_attention(**kw) forward + backward on
    this group's shards of ``full`` (q, k, v, do); the values are the max over the group's ranks (the time rank
    0's)."""
    import torch.distributed as dist

    import fastattn
    from fastattn import distributed as fd
    layout = kw.get("layout", "zigzag")
    q, k, v = (fd.shard(t, group, layout=layout).requires_grad_() for t in full[:3])
    do = fd.shard(full[3], group, layout=layout)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group)

    def step():
        fastattn.distributed.context_parallel_attention(q, k, v, group, **kw).backward(do)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fd.comm_stats(reset=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastattn.distributed.context_parallel_attention(q, k, v, group, **kw)
    sent_fwd = fd.comm_stats(reset=True)["bytes"]
    out.backward(do)
    sent_bwd = fd.comm_stats(reset=True)["bytes"]
    del out
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    mine = {"saved": sum(seen.values()), "sent_fwd": sent_fwd, "sent_bwd": sent_bwd, "peak": peak}
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    row = {"step_ms": statistics.median(times)}
    for key in mine:  # the rank that needs most
        vals = [e[key] for e in every if e[key] is not None]
        row[key] = max(vals) if vals else None
    return row


def _worker(rank, world, p, device_kind, warmup, reps, out_path):
    import torch.distributed as dist

    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    groups = {n: dist.new_group(list(range(n))) for n in RANKS}  # collective: every rank, same order
    dtype = getattr(torch, p["dtype"])
    g = torch.Generator().manual_seed(0)
    full = [torch.randn((p["B"], h, p["L"], p["D"]), generator=g).to(device=device, dtype=dtype)
            for h in (p["H"], p["Hkv"], p["Hkv"], p["H"])]
    rows = []
    for n in RANKS:
        dist.barrier()
        if rank >= n:
            continue
        group = groups[n]
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
        row = {"N": n, **_measure(group, full, device, warmup, reps, dict(causal=True))}
        for suffix, kw in (("_win", dict(causal=True, layout="contiguous", window_size=(window(p), -1))),
                           ("_both", dict(layout="contiguous", window_size=(window(p), window(p)))),
                           ("_uly", dict(causal=True, strategy="ulysses")),
                           ("_docs", dict(causal=True, cu_seqlens=documents(p)))):
            row.update({key + suffix: val for key, val in _measure(group, full, device, warmup, reps, kw).items()})
        row.update(_model(p, n))
        rows.append(row)
    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))


def main(argv=None) -> int:
    with common.session(common.first_paragraph(__doc__), argv, 600, "peak memory needs a CUDA GPU (CPU rows give the "
                        "saved-for-backward bytes instead); processes share the CPU cores") as s:
        args, env, out_dir, gpu = s.args, s.env, s.out_dir, s.gpu
        from fastattn.testing import run_distributed
        p = problem(args.mode, gpu)
        nccl = gpu and torch.cuda.device_count() >= WORLD
        backend = "nccl" if nccl else "gloo"
        warmup, reps = {"quick": (1, 3), "default": (2, 5), "full": (3, 10)}[args.mode]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.json"
            run_distributed(_worker, WORLD, p, "cuda" if gpu else "cpu", warmup, reps, str(path), backend=backend,
                            timeout=max(args.budget, 120), threads=None)
            rows = json.loads(path.read_text())

        mib = lambda x: common.fmt(x / MiB if x is not None else None)  # noqa: E731
        t = common.Table(f"ring attention fwd+bwd, causal zigzag, {backend}: per rank (MiB)",
                         ["N", "step ms", "peak", "saved", "sent fwd", "model fwd", "sent bwd", "model bwd",
                          "exact bwd"])
        for r in rows:
            t.add(r["N"], common.fmt(r["step_ms"]), mib(r["peak"]), mib(r["saved"]), mib(r["sent_fwd"]),
                  mib(r["model_fwd"]), mib(r["sent_bwd"]), mib(r["model_bwd"]), mib(r["exact_bwd"]))
        w = common.Table(f"ring attention fwd+bwd, causal sliding window {window(p)} (L/8), contiguous, {backend}: "
                         "per rank (MiB)", ["N", "step ms", "÷ no window", "peak", "sent fwd", "model fwd", "sent bwd",
                                            "model bwd"])
        for r in rows:
            w.add(r["N"], common.fmt(r["step_ms_win"]), common.fmt(r["step_ms_win"] / r["step_ms"]),
                  mib(r["peak_win"]), mib(r["sent_fwd_win"]), mib(r["model_fwd_win"]), mib(r["sent_bwd_win"]),
                  mib(r["model_bwd_win"]))
        b = common.Table(f"ring attention fwd+bwd, sliding window {window(p)} both ways, contiguous, {backend}: per "
                         "rank (MiB)", ["N", "step ms", "÷ causal no window", "peak", "sent fwd", "model fwd",
                                        "sent bwd", "model bwd"])
        for r in rows:
            b.add(r["N"], common.fmt(r["step_ms_both"]), common.fmt(r["step_ms_both"] / r["step_ms"]),
                  mib(r["peak_both"]), mib(r["sent_fwd_both"]), mib(r["model_fwd_both"]), mib(r["sent_bwd_both"]),
                  mib(r["model_bwd_both"]))
        u = common.Table(f"Ulysses (all-to-all) attention fwd+bwd, causal, zigzag, {backend}: per rank (MiB)",
                         ["N", "step ms", "÷ ring", "peak", "sent fwd", "sent bwd", "model fwd = bwd"])
        for r in rows:
            u.add(r["N"], common.fmt(r["step_ms_uly"]), common.fmt(r["step_ms_uly"] / r["step_ms"]),
                  mib(r["peak_uly"]), mib(r["sent_fwd_uly"]), mib(r["sent_bwd_uly"]), mib(r["model_uly"]))
        d = common.Table(f"ring attention fwd+bwd, causal, 5 packed documents (cu_seqlens), zigzag, {backend}: per "
                         "rank (MiB)", ["N", "step ms", "÷ one document", "peak", "sent fwd", "sent bwd"])
        for r in rows:
            d.add(r["N"], common.fmt(r["step_ms_docs"]), common.fmt(r["step_ms_docs"] / r["step_ms"]),
                  mib(r["peak_docs"]), mib(r["sent_fwd_docs"]), mib(r["sent_bwd_docs"]))
        pngs = []
        if not args.no_plots:
            series = {label: [(r["N"], r[key] / MiB or None) for r in rows] for key, label in (
                ("sent_fwd", "sent fwd"), ("model_fwd", "model fwd"), ("sent_bwd", "sent bwd"),
                ("model_bwd", "model bwd (issue)"), ("exact_bwd", "exact bwd"))}
            panels = [("MiB sent per rank", series),  # first: the legend is this panel's
                      ("fwd+bwd step, ms (rank 0)", {"step": [(r["N"], r["step_ms"]) for r in rows]})]
            png = common.plot_lines(out_dir / "context_parallel.png", f"ring attention vs ranks — {env['device']}, "
                                    f"torch {env['torch']}, {env['date'][:10]}", panels, "ranks N", "")
            pngs = [png] if png else []
        shape = ", ".join(f"{k}={v}" for k, v in p.items())
        notes = [f"global problem {shape}; causal, layout zigzag; backend {backend}"
                 + ("" if nccl or not gpu else " (processes share one GPU: transfers staged through host memory)"),
                 "model: forward 2·(N−1)/N of K's bytes (K/V shards sent N−1 times), backward twice that; exact: "
                 "dK/dV travel in fp32 and make N hops, so backward = forward + |KV|·4/element size",
                 "sent: bytes counted in fastattn.distributed's send wrapper (comm_stats), max over ranks",
                 "window rows: the ring stops after the last step some window reaches (here one): the forward sends "
                 "a rank's K/V shard once, |KV|/N; the backward that again plus dK/dV (fp32) twice, the second time "
                 "straight home; '÷ no window' is the step time over the causal zigzag row's",
                 "both-ways window rows: shards after a rank's own come from a second ring running backward (from "
                 "N = 4: one step each way): the forward sends a rank's K/V shard twice; the backward that again "
                 "plus dK/dV (fp32) three times",
                 "Ulysses rows (strategy='ulysses'): all-to-alls give each rank the whole sequence of H/N heads and "
                 "one fastattn.attention call; '÷ ring' is the step time over the ring's causal zigzag row's",
                 "document rows: blocks between different documents are skipped, the others cut into blocks of "
                 "whole documents (a same-document mask only for runs of short ones); '÷ one document' is the step "
                 "time over the causal zigzag row's"]
        if not gpu:
            notes.append("peak: needs a CUDA GPU (torch.cuda.max_memory_allocated); on CPU only saved-for-backward "
                         "bytes")
        common.report(NAME, args, env, [t, w, b, u, d], notes, rows, pngs, out_dir, {"problem": p, "backend": backend})
    return 0


if __name__ == "__main__":
    sys.exit(main())
