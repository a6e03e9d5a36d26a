"""The numerical-correctness rule (DESIGN.md §5), public so users can test their own kernels with it.

For every output and gradient:

    max|kernel − ref64| <= F · max|ref_lowp − ref64| + floor

ref64 is the reference in float64, ref_lowp the same reference run in the kernel's dtype, F = 2 for forward
outputs and 3 for gradients, and floor = 2 · max|(ref64 + 0.3 − 0.3) − ref64| with the arithmetic done in the
output dtype (FlashAttention-3's rule: the rounding error of the dtype at the outputs' magnitude).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 3.0


@dataclass
class Comparison:
    name: str
    max_error: float  # max|out − ref64|
    baseline_error: float  # max|ref_lowp − ref64|
    floor: float
    allowed: float
    where: tuple  # index of the largest error
    ok: bool

    factor: float = FORWARD_FACTOR

    @property
    def ratio(self) -> float:
        """max_error / (baseline + floor / F): the test passes while this is <= F."""
        denom = self.baseline_error + self.floor / self.factor
        return self.max_error / denom if denom > 0 else (0.0 if self.max_error == 0 else float("inf"))

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: max error {self.max_error:.3e} at {self.where}, baseline {self.baseline_error:.3e}, "
                f"floor {self.floor:.3e}, allowed {self.allowed:.3e} (ratio {self.ratio:.2f}, F={self.factor:g}) -> {verdict}")


def rounding_floor(ref64: Tensor, dtype: torch.dtype) -> float:
    """2 · max|(x + 0.3 − 0.3) − x| computed in ``dtype``, for x = ref64 rounded to ``dtype``."""
    if ref64.numel() == 0:
        return 0.0
    x = ref64.to(dtype)
    return 2.0 * (((x + 0.3) - 0.3).double() - ref64.double()).abs().nan_to_num(0.0).max().item()


def compare(out: Tensor, ref64: Tensor, ref_lowp: Tensor, *, factor: float = FORWARD_FACTOR,
            name: str = "out") -> Comparison:
    """Apply the rule to one tensor. NaN where ref64 is finite (or the reverse) always fails."""
    if out.shape != ref64.shape or ref_lowp.shape != ref64.shape:
        raise ValueError(f"{name}: shapes differ: out {tuple(out.shape)}, ref64 {tuple(ref64.shape)}, "
                         f"ref_lowp {tuple(ref_lowp.shape)}")
    out64, low64, ref = out.detach().double().cpu(), ref_lowp.detach().double().cpu(), ref64.detach().double().cpu()
    if ref.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0, 0.0, (), True, factor)
    # equal infinities (e.g. LSE of empty rows) count as exact, and so does NaN where the reference is NaN
    same = (out64 == ref) | (out64.isnan() & ref.isnan())
    err = torch.where(same, torch.zeros_like(ref), (out64 - ref).abs()).nan_to_num(float("inf"))
    base = torch.where(low64 == ref, torch.zeros_like(ref), (low64 - ref).abs()).nan_to_num(0.0)
    finite = torch.isfinite(ref)
    floor = rounding_floor(torch.where(finite, ref, torch.zeros_like(ref)), out.dtype)
    max_err = err.max().item()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    base_err = base.max().item()
    allowed = factor * base_err + floor
    return Comparison(name, max_err, base_err, floor, allowed, where, bool(max_err <= allowed), factor)


def check_close(out: Tensor, ref64: Tensor, ref_lowp: Tensor, *, factor: float = FORWARD_FACTOR,
                name: str = "out") -> Comparison:
    """Assert the rule; the AssertionError says how large the error is, where, and against what baseline."""
    c = compare(out, ref64, ref_lowp, factor=factor, name=name)
    if not c.ok:
        raise AssertionError(str(c))
    return c


# --------------------------------------------------------------------------------------------- case generators
def random_qkv(B: int, H: int, Lq: int, Lk: int, D: int, *, Hkv: int | None = None, dtype=torch.float16,
               device="cpu", requires_grad: bool = True, generator: torch.Generator | None = None,
               scale: float = 1.0):
    """Fresh normal q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (times ``scale``: > 1 gives large logits)."""
    Hkv = Hkv or H
    shapes = ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D))
    out = []
    for s in shapes:
        t = (torch.randn(s, generator=generator, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
        out.append(t.requires_grad_(requires_grad))
    return tuple(out)


def random_kv_lens(B: int, Lk: int, *, generator: torch.Generator | None = None, device="cpu",
                   allow_zero: bool = True) -> Tensor:
    """int32 [B] in [0 or 1, Lk]; the first entry is Lk and, if allowed and B > 1, the last is 0."""
    lo = 0 if allow_zero else 1
    lens = torch.randint(lo, Lk + 1, (B,), generator=generator, dtype=torch.int32)
    if B > 0:
        lens[0] = Lk
    if allow_zero and B > 1:
        lens[-1] = 0
    return lens.to(device)


def random_key_padding_mask(B: int, Lk: int, *, generator: torch.Generator | None = None, device="cpu",
                            p: float = 0.3) -> Tensor:
    """bool [B, Lk], True = padding: random holes plus a padded tail of random length per batch."""
    holes = torch.rand(B, Lk, generator=generator) < p
    tail = torch.arange(Lk) >= torch.randint(0, Lk + 1, (B, 1), generator=generator)
    return (holes | tail).to(device)


# --------------------------------------------------------------------------------------------- attention cases
@dataclass
class AttentionCase:
    """One attention problem. Masks and biases are drawn fresh from ``seed``; masks always leave some rows empty
    (a batch with kv_lens 0, bottom-right rows before the first key, a bool-mask row of False)."""
    B: int = 2
    H: int = 2
    Lq: int = 17
    Lk: int = 17
    D: int = 32
    Hkv: int | None = None
    dtype: torch.dtype = torch.float16
    causal: bool = False
    alignment: str = "top_left"
    kv_lens: bool = False
    key_padding: bool = False
    bool_mask: str | None = None  # None | "full" [B,H,Lq,Lk] | "2d" [Lq,Lk]
    # None | "full" [B,H,Lq,Lk] | "heads" [1,H,Lq,Lk] | "batch" [B,1,1,Lk] | "2d" [Lq,Lk] | "rows" [1,H,Lq,1]
    # | "head" [H,1,1]
    bias: str | None = None
    bias_grad: bool = False
    lse_grad: bool = False
    logit_scale: float = 1.0
    window: tuple = (-1, -1)  # window_size (left, right)
    alibi: str | None = None  # None | "heads" [H] standard slopes | "batch" [B, H] random slopes
    softcap: float = 0.0
    dropout: float = 0.0  # dropout_p: the kernel's keep-mask is replayed on the reference
    varlen: tuple | None = None  # packed batch: ((len_q, len_k), ...) per sequence; B, Lq, Lk then follow from it
    # > 0: an attention sink, key 0 gets this much more score in every row (p ≈ e^sink / (e^sink + Lk − 1))
    sink: float = 0.0
    # learnable sinks (the ``sinks`` argument): one logit per head, ln(Lk) + N(0, 2²), so that the sink's weight
    # ranges over (0, 1) across heads; with its gradient
    sinks: bool = False
    lse: bool = True  # return_lse; False: the output alone (backend "torch" then runs torch's SDPA where it can)
    seed: int = 0

    def __post_init__(self):
        if self.varlen is not None:
            self.B = len(self.varlen)
            self.Lq = max(lq for lq, _ in self.varlen)
            self.Lk = max(lk for _, lk in self.varlen)

    def __str__(self) -> str:
        shape = f"Lq{self.Lq} Lk{self.Lk}" if self.varlen is None else "varlen" + str(list(self.varlen)).replace(" ", "")
        parts = [f"B{self.B} H{self.H}" + (f"/{self.Hkv}" if self.Hkv else ""), f"{shape} d{self.D}",
                 str(self.dtype).replace("torch.", "")]
        if self.causal:
            parts.append(f"causal-{self.alignment}")
        parts += [n for n, on in (("kv_lens", self.kv_lens), ("key_padding", self.key_padding),
                                  ("lse_grad", self.lse_grad)) if on]
        if self.bool_mask:
            parts.append(f"mask-{self.bool_mask}")
        if self.bias:
            parts.append(f"bias-{self.bias}" + ("+grad" if self.bias_grad else ""))
        if self.logit_scale != 1.0:
            parts.append(f"logits×{self.logit_scale:g}")
        if tuple(self.window) != (-1, -1):
            parts.append(f"window{tuple(self.window)}".replace(" ", ""))
        if self.alibi:
            parts.append(f"alibi-{self.alibi}")
        if self.softcap:
            parts.append(f"softcap{self.softcap:g}")
        if self.dropout:
            parts.append(f"dropout{self.dropout:g}")
        if self.sink:
            parts.append(f"sink{self.sink:g}")
        if self.sinks:
            parts.append("sinks")
        if not self.lse:
            parts.append("no-lse")
        return " ".join(parts)


def _packed_qkv(case: AttentionCase, g: torch.Generator, device):
    """Packed q [total_q, H, D], k/v [total_k, Hkv, D] and the varlen keyword arguments of ``case``."""
    kw = {}
    for side, lens in (("q", [lq for lq, _ in case.varlen]), ("k", [lk for _, lk in case.varlen])):
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        kw[f"cu_seqlens_{side}"], kw[f"max_seqlen_{side}"] = cu.to(device), max(lens)
    tq, tk = int(kw["cu_seqlens_q"][-1]), int(kw["cu_seqlens_k"][-1])
    shapes = ((tq, case.H, case.D), (tk, case.Hkv or case.H, case.D), (tk, case.Hkv or case.H, case.D))
    q, k, v = ((torch.randn(s, generator=g) * case.logit_scale).to(device=device, dtype=case.dtype).requires_grad_()
               for s in shapes)
    return q, k, v, kw


def _add_sink(q: Tensor, k: Tensor, case: AttentionCase) -> None:
    """Head-dim column 0 of every query and of key 0 becomes c, of the other keys 0: s_i0 gains
    c²/sqrt(D) = case.sink (up to c's rounding) and the other scores lose only their column-0 term."""
    if case.varlen is not None:
        raise ValueError("sink: not for packed batches")
    c = math.sqrt(case.sink * math.sqrt(case.D))
    with torch.no_grad():
        q[..., 0] = c
        k[..., 0] = 0.0
        k[..., 0, 0] = c


def _case_inputs(case: AttentionCase, device):
    g = torch.Generator().manual_seed(case.seed)
    kw = dict(causal=case.causal, causal_alignment=case.alignment)
    if case.varlen is None:
        q, k, v = random_qkv(case.B, case.H, case.Lq, case.Lk, case.D, Hkv=case.Hkv, dtype=case.dtype,
                             device=device, generator=g, scale=case.logit_scale)
    else:
        q, k, v, packed = _packed_qkv(case, g, device)
        kw.update(packed)
    if case.sink:
        _add_sink(q, k, case)
    if tuple(case.window) != (-1, -1):
        kw["window_size"] = tuple(case.window)
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.alibi == "heads":
        from .reference import alibi_slopes
        kw["alibi_slopes"] = alibi_slopes(case.H).to(device)
    elif case.alibi == "batch":
        kw["alibi_slopes"] = torch.rand((case.B, case.H), generator=g).to(device)
    if case.kv_lens:
        kw["kv_lens"] = random_kv_lens(case.B, case.Lk, generator=g, device=device)
    if case.key_padding:
        kw["key_padding_mask"] = random_key_padding_mask(case.B, case.Lk, generator=g, device=device)
    if case.bool_mask:
        shape = {"full": (case.B, case.H, case.Lq, case.Lk), "2d": (case.Lq, case.Lk)}[case.bool_mask]
        m = torch.rand(shape, generator=g) > 0.4
        m[..., case.Lq // 2, :] = False  # one fully masked row
        kw["attn_bias"] = m.to(device)
    if case.bias:
        shape = {"full": (case.B, case.H, case.Lq, case.Lk), "heads": (1, case.H, case.Lq, case.Lk),
                 "batch": (case.B, 1, 1, case.Lk), "2d": (case.Lq, case.Lk), "rows": (1, case.H, case.Lq, 1),
                 "head": (case.H, 1, 1)}[case.bias]
        bias = (torch.randn(shape, generator=g) * 2).to(dtype=case.dtype, device=device)
        if case.bool_mask:
            raise ValueError("a case has either a bool mask or a float bias")
        kw["attn_bias"] = bias.requires_grad_(case.bias_grad)
    if case.sinks:
        sinks = math.log(max(case.Lk, 1)) + 2.0 * torch.randn(case.H, generator=g)
        kw["sinks"] = sinks.to(dtype=case.dtype, device=device).requires_grad_()
    do = torch.randn(q.shape, generator=g).to(dtype=case.dtype, device=device)
    lse_shape = (case.B, case.H, case.Lq) if case.varlen is None else (case.H, q.shape[0])
    dlse = torch.randn(lse_shape, generator=g).to(device) if case.lse_grad else None
    return (q, k, v), kw, do, dlse


def forward_backward(fn, inputs: dict, grad_outputs: dict, dtype: torch.dtype) -> dict:
    """Call ``fn(**inputs)`` with the floating inputs cast to ``dtype`` (those that require grad stay leaves),
    and differentiate the named outputs (``fn`` returns a dict) against ``grad_outputs``.
    Returns the outputs and "d<name>" for every input that requires grad."""
    cast = {n: (t.detach().to(dtype).requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point()
                else t) for n, t in inputs.items()}
    outs = fn(**cast)
    leaves = {n: t for n, t in cast.items() if torch.is_tensor(t) and t.requires_grad}
    used = [n for n in grad_outputs if grad_outputs[n] is not None]
    grads = torch.autograd.grad([outs[n] for n in used], list(leaves.values()),
                                [grad_outputs[n].to(outs[n].dtype) for n in used]) if leaves else ()
    res = dict(outs)
    res.update({"d" + n: g for n, g in zip(leaves, grads)})
    return res


def compare_all(fn, inputs: dict, grad_outputs: dict, dtype: torch.dtype, backend: str) -> list[Comparison]:
    """``fn(backend=..., **inputs)`` on ``backend`` in ``dtype`` against backend "reference" (fastattn.reference in
    the input dtype, no fp32 upcast) in float64 and in ``dtype``: every output (F = 2) and gradient (F = 3) under
    the rule."""
    got = forward_backward(lambda **kw: fn(backend=backend, **kw), inputs, grad_outputs, dtype)
    ref64 = forward_backward(lambda **kw: fn(backend="reference", **kw), inputs, grad_outputs, torch.float64)
    low = forward_backward(lambda **kw: fn(backend="reference", **kw), inputs, grad_outputs, dtype)
    return [compare(got[n], ref64[n], low[n], name=n,
                    factor=BACKWARD_FACTOR if n.startswith("d") else FORWARD_FACTOR) for n in got]


def attention_problem(case: AttentionCase, device="cpu"):
    """-> (fn, inputs, grad_outputs) of ``case`` for :func:`compare_all` and :func:`forward_backward`."""
    import fastattn  # late: fastattn imports this module's users

    (q, k, v), kw, do, dlse = _case_inputs(case, device)
    bias = kw.pop("attn_bias", None)
    sinks = kw.pop("sinks", None)
    keep = {}  # the kernel runs first (compare_all); the reference then replays its dropout mask
    if case.dropout:
        torch.manual_seed(case.seed)  # the kernel's dropout seed comes from torch's generator: same mask every run

    def fn(q, k, v, attn_bias, sinks, backend):
        extra = {} if sinks is None else {"sinks": sinks}
        if case.dropout:
            extra.update(dict(dropout_mask=keep["mask"]) if backend in ("torch", "reference")
                         else dict(return_dropout_mask=True))
        res = fastattn.attention(q, k, v, attn_bias=attn_bias, return_lse=case.lse, backend=backend,
                                 dropout_p=case.dropout, **extra, **kw)
        res = res if isinstance(res, tuple) else (res,)
        if "return_dropout_mask" in extra:
            keep["mask"] = res[-1]
        return {"out": res[0], "lse": res[1]} if case.lse else {"out": res[0]}

    return fn, dict(q=q, k=k, v=v, attn_bias=bias, sinks=sinks), {"out": do, "lse": dlse}


def run_attention_case(case: AttentionCase, backend: str, device="cpu") -> list[Comparison]:
    """Run ``case`` on ``backend`` and compare every output and gradient to the float64 reference under the rule."""
    return compare_all(*attention_problem(case, device), case.dtype, backend)


# --------------------------------------------------------------------------------------------- softmax cases
@dataclass
class SoftmaxCase:
    """softmax(x·scale + mask) along ``dim``; a few rows are −inf throughout, and one row holds a large value."""
    shape: tuple = (6, 127)
    dim: int = -1
    dtype: torch.dtype = torch.float16
    out_dtype: torch.dtype | None = None
    scale: float = 1.0
    mask: str | None = None  # None | "row" [N] | "full" (x's shape) | "lead" [shape[0], 1, ..., N]
    mask_grad: bool = False
    seed: int = 0

    def __str__(self) -> str:
        parts = ["x" + "x".join(map(str, self.shape)), f"dim{self.dim}", str(self.dtype).replace("torch.", "")]
        if self.out_dtype:
            parts.append("->" + str(self.out_dtype).replace("torch.", ""))
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:g}")
        if self.mask:
            parts.append(f"mask-{self.mask}" + ("+grad" if self.mask_grad else ""))
        return " ".join(parts)


def softmax_problem(case: SoftmaxCase, device="cpu"):
    """-> (fn, inputs, grad_outputs) of ``case``."""
    import fastattn

    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.shape, generator=g) * 3
    rows = x.movedim(case.dim, -1)
    if rows.shape[0] > 1:
        rows[1] = float("-inf")  # fully masked rows: zeros, not NaN
    rows[(0,) * rows.dim()] = 40.0  # a large logit
    x = x.to(device).requires_grad_()
    mask = None
    if case.mask:
        N = case.shape[-1]
        mshape = {"row": (N,), "full": case.shape, "lead": (case.shape[0],) + (1,) * (len(case.shape) - 2) + (N,)}
        mask = torch.randn(mshape[case.mask], generator=g).to(device).requires_grad_(case.mask_grad)
    dy = torch.randn(case.shape, generator=g).to(device)

    def fn(x, mask, backend):
        out_dtype = case.out_dtype if x.dtype != torch.float64 else None  # ref64 stays float64 throughout
        return {"y": fastattn.softmax(x, case.dim, out_dtype, scale=case.scale, mask=mask, backend=backend)}

    return fn, dict(x=x, mask=mask), {"y": dy}


def run_softmax_case(case: SoftmaxCase, backend: str, device="cpu") -> list[Comparison]:
    return compare_all(*softmax_problem(case, device), case.dtype, backend)


# --------------------------------------------------------------------------------------------- layer norm cases
@dataclass
class LayerNormCase:
    """LayerNorm over the trailing ``norm_dims`` dims of x (+ residual), with optional weight / bias."""
    shape: tuple = (6, 768)
    norm_dims: int = 1
    dtype: torch.dtype = torch.float16
    weight: bool = True
    bias: bool = True
    residual: bool = False
    prenorm: bool = False
    offset: float = 0.0  # added to x: a large mean tests the variance's cancellation
    eps: float = 1e-5
    seed: int = 0

    def __str__(self) -> str:
        parts = ["x" + "x".join(map(str, self.shape)), f"norm{self.norm_dims}", str(self.dtype).replace("torch.", "")]
        parts += [n for n, on in (("no-weight", not self.weight), ("no-bias", not self.bias),
                                  ("+residual", self.residual), ("prenorm", self.prenorm)) if on]
        if self.offset:
            parts.append(f"offset{self.offset:g}")
        return " ".join(parts)


def layer_norm_problem(case: LayerNormCase, device="cpu"):
    """-> (fn, inputs, grad_outputs) of ``case``."""
    import fastattn

    g = torch.Generator().manual_seed(case.seed)
    norm = tuple(case.shape[len(case.shape) - case.norm_dims:])

    def rnd(shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g) * scale + shift).to(device).requires_grad_()

    inputs = dict(x=rnd(case.shape, 2.0, case.offset),
                  residual=rnd(case.shape) if case.residual else None,
                  weight=rnd(norm, 0.5, 1.0) if case.weight else None,
                  bias=rnd(norm) if case.bias else None)
    grads = {"y": torch.randn(case.shape, generator=g).to(device),
             "sum": torch.randn(case.shape, generator=g).to(device) if case.prenorm else None}

    def fn(x, residual, weight, bias, backend):
        if residual is None:
            return {"y": fastattn.layer_norm(x, norm, weight, bias, case.eps, backend=backend)}
        y, s = fastattn.add_layer_norm(x, residual, norm, weight, bias, case.eps, prenorm=True, backend=backend)
        return {"y": y, "sum": s}

    return fn, inputs, grads


def run_layer_norm_case(case: LayerNormCase, backend: str, device="cpu") -> list[Comparison]:
    return compare_all(*layer_norm_problem(case, device), case.dtype, backend)


# --------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_entry(rank, world_size, port, backend, module, path, name, args, timeout, threads):
    import datetime
    import importlib
    import importlib.util
    import sys

    import torch.distributed as dist

    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except ImportError:  # a script loaded by path (benchmarks/): load it the same way here
            spec = importlib.util.spec_from_file_location(module, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)
    if threads:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        getattr(mod, name)(rank, world_size, *args)
        # Every rank done before any tears down: a gloo rank whose peer exits early can abort ("terminate called
        # without an active exception", seen in ~20 % of 2-rank torchrun runs of a plain training step).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0,
                    threads: int | None = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in a torch.distributed
    process group (``backend``, TCP rendezvous on a free local port). ``fn`` must be a module-level function.
    Raises the first process's error; after ``timeout`` seconds kills the processes and raises TimeoutError, so
    a hang fails instead of blocking. ``threads``: torch threads per process (None: torch's default)."""
    import inspect
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_distributed_entry, nprocs=world_size, join=False, start_method="spawn",
                             args=(world_size, _free_port(), backend, fn.__module__, inspect.getfile(fn),
                                   fn.__name__, args, timeout, threads))
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join()
            raise TimeoutError(f"{fn.__name__} in {world_size} processes did not finish within {timeout:g} s")
