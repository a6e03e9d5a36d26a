"""Peak extra memory of attention forward + backward vs sequence length: fastattn (linear in L) against the
unfused reference (quadratic: it keeps L×L scores and probabilities for backward), with SDPA's default choice
for comparison; on the CPU also fastattn's backend "torch" (torch's SDPA, or the reference in row chunks).

Two measures per row:
  peak    (CUDA only) torch.cuda.max_memory_allocated() during out = attn(q, k, v); out.backward(dout), minus
          what was allocated before (q, k, v, dout); includes the gradients dq, dk, dv. After one warm-up call.
  saved   bytes of the tensors autograd saves for backward during the forward (torch.autograd.graph.
          saved_tensors_hooks, each storage counted once, q/k/v themselves excluded); on CPU the only measure.
Shapes: B = 1, H = 16, D = 128, bf16 on the GPU; B = 1, H = 4, D = 64, fp32 at small L on CPU.

    python benchmarks/bench_memory.py [--quick | --full] [--out DIR]
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import Skip  # noqa: E402

NAME = "memory"
PROVIDERS = ("fastattn-triton", "fastattn-cuda", "fastattn-torch", "sdpa-default", "ref-eager")
MiB = 1 << 20
NOTES = ["peak (CUDA only): torch.cuda.max_memory_allocated() over out = attn(q, k, v); out.backward(dout) minus "
         "the memory allocated before (q, k, v, dout), after one warm-up call; includes dq, dk, dv",
         "saved: bytes of the distinct storages autograd saves for backward in the forward (saved_tensors_hooks), "
         "q, k, v excluded; the only measure on CPU (no peak-memory counter there)"]


def lengths(mode: str, gpu: bool) -> list:
    if not gpu:
        return [128, 256, 512, 1024] + ([] if mode == "quick" else [2048])
    Ls = [512, 1024, 2048, 4096]
    return Ls + ([] if mode == "quick" else [8192, 16384] + ([32768, 65536] if mode == "full" else []))


def saved_bytes(fn, exclude) -> tuple:
    """(output, bytes of the distinct storages autograd saved during ``fn()``, except those in ``exclude``)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without plain storage
            pass
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def attention_fn(provider: str, q, k, v, device: str):
    import fastattn
    if provider == "fastattn-torch":  # backend "torch", the CPU's: SDPA, or the reference in row chunks
        if common.is_cuda(device):
            raise Skip("fastattn-torch: the CPU backend (on a GPU, fastattn-triton's row)")
        return lambda: fastattn.attention(q, k, v, backend="torch")
    if provider.startswith("fastattn"):
        backend = common.fastattn_backend(provider, device)
        return lambda: fastattn.attention(q, k, v, backend=backend)
    if provider == "sdpa-default":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from fastattn import reference
    B, H, L, _ = q.shape
    scores = B * H * L * L * q.element_size()
    if scores > common.SCORES_CAP:
        raise Skip(f"ref-eager: one L×L score tensor = {scores / 1e9:.1f} GB > {common.SCORES_CAP / 1e9:g} GB cap")
    return lambda: reference.attention(q, k, v)


def measure(provider: str, L: int, device: str) -> dict:
    gpu = common.is_cuda(device)
    B, H, D, dtype = (1, 16, 128, torch.bfloat16) if gpu else (1, 4, 64, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    fn = attention_fn(provider, q, k, v, device)
    fn().backward(dout)  # warm-up: kernels compiled, library workspaces allocated
    for t in (q, k, v):
        t.grad = None
    row = {"inputs_bytes": 4 * q.numel() * q.element_size()}
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out, row["saved_bytes"] = saved_bytes(fn, (q, k, v))
    out.backward(dout)
    if gpu:
        torch.cuda.synchronize()
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    return row


def main(argv=None) -> int:
    with common.session(common.first_paragraph(__doc__), argv, 40,
                        "fastattn's kernel rows are skipped; saved-for-backward bytes of backend "
                        "'torch', the reference and SDPA are counted on CPU (no peak-memory counter there)") as s:
        args, env, out_dir, budget, gpu = s.args, s.env, s.out_dir, s.budget, s.gpu
        rows = []
        for L in common.progress(lengths(args.mode, gpu), NAME):
            row = {"L": L, "results": {}}
            for p in PROVIDERS:
                try:
                    budget.check()
                    row["results"][p] = measure(p, L, args.device)
                except Exception as e:  # noqa: BLE001 - Skip, out of memory, unsupported: recorded
                    row["results"][p] = {"reason": common.reason_of(e)}
                common.free_memory(args.device)
            rows.append(row)
            common.report(NAME, args, env, [], NOTES, rows, [], out_dir, partial=True)

        metrics = (("peak_extra_bytes", "peak"), ("saved_bytes", "saved")) if gpu else (("saved_bytes", "saved"),)
        t = common.Table("attention fwd+bwd memory, MiB (peak extra over the inputs; saved for backward)",
                         ["L", *(f"{p} {m}" for _, m in metrics for p in PROVIDERS), "ref ÷ fastattn (saved)"])
        for r in rows:
            res = r["results"]
            mib = lambda p, key: res[p].get(key) / MiB if res[p].get(key) is not None else None  # noqa: E731
            fa, ref = mib("fastattn-triton", "saved_bytes"), mib("ref-eager", "saved_bytes")
            t.add(r["L"], *(common.fmt(mib(p, key)) for key, _ in metrics for p in PROVIDERS),
                  common.fmt(ref / fa if fa and ref else None, ".1f"))
        pngs = []
        if not args.no_plots:
            panels = [(label, {p: [(r["L"], (r["results"][p].get(key) or 0) / MiB or None) for r in rows]
                               for p in PROVIDERS}) for key, label in metrics]
            png = common.plot_lines(out_dir / "memory.png", f"attention fwd+bwd memory (MiB, log-log) — "
                                    f"{env['device']}, torch {env['torch']}, {env['date'][:10]}", panels,
                                    "sequence length", "MiB", logy=True)
            pngs = [png] if png else []
        shape = "B=1, H=16, D=128, bf16" if gpu else "B=1, H=4, D=64, fp32"
        notes = [f"shape {shape}; non-causal", *NOTES]
        notes += common.notes_from_reasons(common.reasons_by_provider([r["results"] for r in rows]))
        common.report(NAME, args, env, [t], notes, rows, pngs, out_dir, {"shape": shape})
    return 0


if __name__ == "__main__":
    sys.exit(main())
