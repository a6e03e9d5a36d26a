"""Attention forward / backward / forward+backward: time and TFLOPS, fastattn against PyTorch in one run.

FLOPs follow FlashAttention's benchmark: forward 4·B·H·Lq·Lk·D (two matmuls), halved for causal, backward 2.5×
forward, forward+backward 3.5×; key-padding rows count only the visible keys n = Lk·(1 − padded fraction) (causal: Lq·n − n²/2 pairs),
sliding-window rows only the (query, key) pairs inside the window. Shapes: 16k tokens per batch (B = 16384 // L),
H·D = 2048 (H = 2048 // D). The ratio column is fastattn's TFLOPS ÷ the best other provider's (> 1: fastattn is
faster).

Sliding-window rows (causal local attention, window (w, 0): query i sees keys i − w..i) get a second table: time
per token (ns per query token, ms ÷ (B·L)), which is flat in L when the kernel skips the key blocks outside the
window (O(L·w) work), and the speed-up over SDPA given the equivalent dense L×L bool mask.

Decoding rows (one query per sequence against a KV cache of Lk keys, or 4 for speculative decoding; GQA 32/8, d128,
forward only) get a third table: time, the K/V read bandwidth (B·Hkv·Lk·D·2 elements read once), and the gains of
each backend's split-KV and packed GQA (same kernel with one forced off ÷ with the heuristics' choice).

    python benchmarks/bench_attention.py [--quick | --full | --rehearse] [--autotune] [--out DIR] [--budget S]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import Skip  # noqa: E402

NAME = "attention"
TOKENS = 16384
HIDDEN = 2048
SCORES_CAP = common.SCORES_CAP
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
FASTATTN = ("fastattn-triton", "fastattn-cuda")
SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-math": "MATH"}
OTHERS = (*SDPA, "flex-compiled", "ref-compiled", "ref-eager")
PROVIDERS = (*FASTATTN, *OTHERS)
SHORT = {"fastattn-triton": "triton", "fastattn-cuda": "cuda", "sdpa-flash": "flash", "sdpa-efficient": "effic",
         "sdpa-cudnn": "cudnn", "sdpa-math": "math", "flex-compiled": "flex", "ref-compiled": "ref-c",
         "ref-eager": "ref"}
NOTES = [
    "FLOPs (FlashAttention's convention): fwd 4·B·H·Lq·Lk·D, halved for causal; bwd 2.5× fwd; fwd+bwd 3.5× fwd; "
    "padding rows count only the visible keys n (causal: the Lq·n − n²/2 pairs on or below the diagonal)",
    "ratio = fastattn TFLOPS ÷ best other provider's TFLOPS (> 1: fastattn faster); '-' = could not run (notes)",
    "fwd is timed with autograd recording (inputs require grad); bwd = backward of one retained graph",
    "key padding: fastattn gets kv_lens (every sequence has the same number of valid keys); SDPA and the "
    "reference get the equivalent bool mask [B, 1, 1, Lk]; FlexAttention a block mask from kv_lens",
    "bias rows: dense float bias [1, H, Lq, Lk] in the input dtype that requires grad (its gradient is computed)",
    f"unfused baselines (sdpa-math, ref-compiled, ref-eager) skipped when one B·H·Lq·Lk score tensor exceeds "
    f"{SCORES_CAP / 1e9:g} GB",
    "window rows: causal local attention, window (w, 0); fastattn gets window_size=(w, 0) (no L×L tensor, key "
    "blocks outside the window skipped); SDPA the equivalent dense bool mask [L, L] (True = attend; skipped when it "
    "would not fit in memory); FlexAttention a block mask from the same mask_mod (create_block_mask); FLOPs count "
    "the pairs inside the window",
    "varlen rows: B sequences of lengths spread evenly over [L(1 − 2·pad), L]; fastattn runs the packed batch "
    "(cu_seqlens, no padding); SDPA and the reference the padded batch with the bool key mask [B, 1, 1, L] (and "
    "causal), FlexAttention a block mask from the lengths; FLOPs count only real tokens' pairs Σ n_b²",
    "sinks rows: learnable per-head sink logits (GPT-OSS: GQA 8 queries per kv head, d64), fp32 [H] with gradient, "
    "for fastattn (sinks=) and the reference; SDPA and FlexAttention take no sinks (skipped); the gqa row of the "
    "same shape beside it runs without: the sinks' cost",
    "window table: ns per query token = ms ÷ (B·L) (flat in L = O(L·w) work); ×sdpa-mask = best SDPA-with-mask "
    "time ÷ fastattn time (> 1: fastattn faster); flat = ns/token ÷ ns/token of the same w and pass at the "
    "smallest L",
]


@dataclass(frozen=True)
class Case:
    kind: str  # sweep | padding | bias | cross | gqa | window | varlen | decode | sinks
    dtype: torch.dtype
    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    causal: bool = False
    pad: float = 0.0  # fraction of padded keys (varlen: of padded tokens, lengths spread over [L(1 − 2·pad), L])
    bias: bool = False
    compiled: bool = False  # in the default grid's subset of rows with torch.compile baselines
    window: int = 0  # > 0: causal local attention, window (window, 0)
    sinks: bool = False  # learnable per-head sink logits (fastattn and the reference only)
    gpu_only: bool = False  # sized for a GPU: skipped (with the reason) if run on a CPU

    @property
    def name(self) -> str:
        s = f"{common.dtype_name(self.dtype)} B{self.B} H{self.H}"
        s += f"/{self.Hkv}" if self.Hkv != self.H else ""
        s += f" L{self.Lq}" if self.Lq == self.Lk else f" Lq{self.Lq} Lk{self.Lk}"
        s += f" d{self.D}" + (" causal" if self.causal else "")
        s += f" pad{int(self.pad * 100)}%" if self.pad else ""
        s += " varlen" if self.kind == "varlen" else ""
        s += f" window{self.window}" if self.window else ""
        return s + (" bias" if self.bias else "") + (" sinks" if self.sinks else "")

    @property
    def kv_len(self) -> int:
        return round(self.Lk * (1.0 - self.pad))

    @property
    def window_pairs(self) -> int:
        """(query, key) pairs of causal local attention, Lq == Lk = L: Σ_i (min(i, w) + 1)."""
        L, w = self.Lq, self.window
        return L + ((L - 1) * L // 2 if L - 1 <= w else w * (w + 1) // 2 + (L - 1 - w) * w)

    @property
    def passes(self) -> tuple:
        return ("fwd",) if self.kind == "decode" else PASSES

    @property
    def kv_bytes(self) -> int:
        """K and V of the cache, read once."""
        return 2 * self.B * self.Hkv * self.Lk * self.D * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def lengths(self) -> list[int]:
        """varlen rows: the B sequence lengths, evenly spread over [L(1 − 2·pad), L] (mean L(1 − pad))."""
        lo = self.Lq * (1.0 - 2.0 * self.pad)
        return [max(1, round(lo + (self.Lq - lo) * (b + 0.5) / self.B)) for b in range(self.B)]

    def flops(self, p: str) -> float:
        if self.kind == "varlen":  # only the real tokens' pairs: Σ_b n_b² (halved for causal)
            pairs = sum(n * n for n in self.lengths) * (0.5 if self.causal else 1.0)
            return 4.0 * self.H * pairs * self.D * FLOP_FACTOR[p]
        if self.window:
            return 4.0 * self.B * self.H * self.window_pairs * self.D * FLOP_FACTOR[p]
        n = self.kv_len
        # Causal (top-left) with n visible keys: the part of the Lq × n block on or below the diagonal, as area
        # (Lq·n − n²/2; n = Lq gives FlashAttention's Lq²/2). Halving Lq·n would undercount padded rows.
        m = min(n, self.Lq)
        pairs = self.Lq * m - m * m / 2.0 if self.causal else self.Lq * n
        return 4.0 * self.B * self.H * pairs * self.D * FLOP_FACTOR[p]

    @property
    def scores_bytes(self) -> int:
        return self.B * self.H * self.Lq * self.Lk * torch.tensor([], dtype=self.dtype).element_size()

    def to_json(self) -> dict:
        return {"case": self.name, "kind": self.kind, "dtype": common.dtype_name(self.dtype), "B": self.B,
                "H": self.H, "Hkv": self.Hkv, "Lq": self.Lq, "Lk": self.Lk, "D": self.D, "causal": self.causal,
                "pad": self.pad, "bias": self.bias, "window": self.window, "sinks": self.sinks,
                "flops_fwd": self.flops("fwd"),
                "kv_bytes": self.kv_bytes}


def square(dtype, L, D, causal, **kw) -> Case:
    H = HIDDEN // D
    return Case(kw.pop("kind", "sweep"), dtype, max(1, TOKENS // L), H, kw.pop("Hkv", H), L, L, D, causal, **kw)


WINDOWS = (256, 1024)
WINDOW_LENGTHS = (2048, 4096, 8192, 16384, 32768)


def window_rows(dtype, windows, lengths) -> list[Case]:
    """Causal local attention (window (w, 0)), d128, torch.compile baselines (FlexAttention) on every row."""
    return [square(dtype, L, 128, True, kind="window", window=w, compiled=True, gpu_only=True)
            for w in windows for L in lengths]


DECODE_LENGTHS = (4096, 16384, 65536)


def decode_rows(dtype, batches, lengths, queries=1) -> list[Case]:
    """``queries`` per sequence (1: decoding; a few: speculative decoding's draft tokens) against a cache of Lk
    keys: H 32 / Hkv 8 (GQA), d128, no mask (the queries are last: a causal mask would hide at most queries − 1
    keys)."""
    return [Case("decode", dtype, B, 32, 8, queries, L, 128, gpu_only=True) for B in batches for L in lengths]


def grid(mode: str, gpu: bool) -> list[Case]:
    """Rows in priority order (a spent --budget drops the last ones)."""
    bf16, fp16 = torch.bfloat16, torch.float16
    if mode == "rehearse":  # every kind of row at tiny sizes, fp16 (the interpreter cannot run bf16)
        return [*(Case("sweep", fp16, 1, 2, 2, n, n, 32, c) for c in (False, True) for n in (32, 64)),
                Case("padding", fp16, 2, 2, 2, 64, 64, 32, pad=0.25), Case("gqa", fp16, 1, 4, 2, 64, 64, 32, True),
                Case("bias", fp16, 1, 2, 2, 48, 48, 32, bias=True), Case("cross", fp16, 1, 2, 2, 40, 96, 32),
                *(Case("window", fp16, 1, 2, 2, n, n, 32, True, window=16) for n in (64, 128)),
                Case("varlen", fp16, 3, 2, 2, 48, 48, 32, True, pad=0.5), Case("decode", fp16, 2, 4, 2, 1, 160, 32),
                Case("sinks", fp16, 1, 4, 2, 64, 64, 32, True, sinks=True)]
    if not gpu:  # CPU: the reference / SDPA rows at toy sizes, fp32 (CPU half matmuls are slow)
        f32, L = torch.float32, 128
        Ls = (64, 128) if mode == "quick" else (128, 256, 512, 1024)
        cases = [Case("sweep", f32, 1, 2, 2, n, n, 32, c) for c in (False, True) for n in Ls]
        return cases + [Case("padding", f32, 1, 2, 2, L, L, 32, pad=0.5), Case("gqa", f32, 1, 4, 2, L, L, 32, True),
                        Case("bias", f32, 1, 2, 2, L, L, 32, bias=True),
                        Case("window", f32, 1, 2, 2, 2 * L, 2 * L, 32, True, window=32),
                        Case("varlen", f32, 4, 2, 2, L, L, 32, True, pad=0.5),
                        Case("decode", f32, 2, 4, 2, 1, 4 * L, 32),
                        Case("sinks", f32, 1, 4, 2, L, L, 32, True, sinks=True)]
    if mode == "quick":
        return [square(bf16, L, 128, c) for c in (False, True) for L in (1024, 4096)] + [
            square(bf16, 4096, 128, False, kind="padding", pad=0.5),
            square(bf16, 4096, 128, True, kind="gqa", Hkv=2), *window_rows(bf16, (256,), (4096,)),
            square(bf16, 4096, 128, True, kind="varlen", pad=0.5), *decode_rows(bf16, (1,), (16384,))]
    Ls = (512, 1024, 2048, 4096, 8192, 16384)
    full = mode == "full"
    cases = []
    for dtype in ((bf16, fp16) if full else (bf16,)):
        for D in ((128, 64, 256) if full else (128, 64)):
            cases += [square(dtype, L, D, c, compiled=D == 128 and L in (2048, 8192))
                      for c in (False, True) for L in Ls]
    pads = [square(bf16, L, 128, c, kind="padding", pad=p)
            for L in ((1024, 4096, 16384) if full else (4096,)) for c in ((False, True) if full else (False,))
            for p in (0.25, 0.5)]
    gqa = [square(bf16, L, 128, c, kind="gqa", Hkv=hkv) for L in ((2048, 8192) if not full else Ls)
           for c in ((True,) if not full else (False, True)) for hkv in ((2,) if not full else (2, 1))]
    varlen = [square(bf16, L, 128, c, kind="varlen", pad=p) for L in ((2048, 8192) if not full else (1024, 4096, 16384))
              for c in (False, True) for p in ((0.5,) if not full else (0.25, 0.5))]
    bias = [square(bf16, L, 128, False, kind="bias", bias=True) for L in ((2048,) if not full else (1024, 2048, 4096))]
    sinks = [square(bf16, 4096, 64, True, kind=kind, Hkv=4, sinks=kind == "sinks") for kind in ("sinks", "gqa")]
    cross = [Case("cross", bf16, TOKENS // max(lq, lk), 16, 16, lq, lk, 128)
             for lq, lk in (((1024, 8192),) if not full else ((1024, 8192), (8192, 1024), (512, 16384)))]
    # Sliding window after the main sweep: ahead of the rarer kinds when --budget runs out.
    cases += window_rows(bf16, WINDOWS, WINDOW_LENGTHS) + decode_rows(bf16, (1, 8), DECODE_LENGTHS)
    cases += decode_rows(bf16, (8,), (16384,), queries=4)
    cases += gqa + pads + varlen + bias + cross + sinks
    if not full:  # a few fp16 rows and the fastattn-only head dim 256
        cases += [square(fp16, 8192, 128, c) for c in (False, True)]
        cases += [square(bf16, 4096, 256, c) for c in (False, True)]
    return cases


# ------------------------------------------------------------------------------------------------ providers
def inputs(case: Case, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device=device, dtype=case.dtype, generator=g)  # noqa: E731
    q = mk(case.B, case.H, case.Lq, case.D).requires_grad_()
    k = mk(case.B, case.Hkv, case.Lk, case.D).requires_grad_()
    v = mk(case.B, case.Hkv, case.Lk, case.D).requires_grad_()
    x = {"q": q, "k": k, "v": v, "dout": mk(case.B, case.H, case.Lq, case.D),
         "kv_lens": None, "attend": None, "bias": None, "sinks": None}
    if case.sinks:  # around ln(Lk): the sinks take a fair share of each row's weight
        x["sinks"] = (torch.randn(case.H, device=device, generator=g) + float(torch.tensor(case.Lk).log())
                      ).requires_grad_()
    if case.pad:
        x["kv_lens"] = torch.full((case.B,), case.kv_len, device=device, dtype=torch.int32)
        x["attend"] = (torch.arange(case.Lk, device=device) < case.kv_len).view(1, 1, 1, case.Lk).expand(
            case.B, 1, 1, case.Lk)
    if case.bias:
        x["bias"] = (mk(1, case.H, case.Lq, case.Lk) * 0.5).requires_grad_()
    if case.kind == "varlen":  # padded batch for the others (kv_lens / bool mask), packed copy for fastattn
        import fastattn
        lens = torch.tensor(case.lengths, device=device)
        x["kv_lens"] = lens.to(torch.int32)
        x["attend"] = (torch.arange(case.Lk, device=device) < lens[:, None]).view(case.B, 1, 1, case.Lk)
        pad = ~x["attend"].view(case.B, case.Lk)
        packed = [fastattn.unpad(t.detach().transpose(1, 2), pad) for t in (q, k, v, x["dout"])]
        cu, x["max_len"] = packed[0][2], packed[0][3]
        x["packed"] = [t[0].requires_grad_(i < 3) for i, t in enumerate(packed)] + [cu]
    return x


def leaves(x: dict) -> list:
    return [x["q"], x["k"], x["v"], x["bias"], x["sinks"]]


def _check_unfused(case: Case, name: str) -> None:
    if case.scores_bytes > SCORES_CAP:
        raise Skip(f"{name}: one B·H·Lq·Lk score tensor = {case.scores_bytes / 1e9:.1f} GB > "
                   f"{SCORES_CAP / 1e9:g} GB cap")


def make_fastattn(case: Case, x: dict, device: str, provider: str):
    backend = common.fastattn_backend(provider, device)
    import fastattn

    local = {"window_size": (case.window, 0)} if case.window else {}
    if case.kind == "varlen":
        q, k, v, dout, cu = x["packed"]
        m = x["max_len"]

        def fwd_packed():
            return fastattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m,
                                      causal=case.causal, backend=backend)
        return fwd_packed, dout, [q, k, v]

    def fwd():
        return fastattn.attention(x["q"], x["k"], x["v"], causal=case.causal, kv_lens=x["kv_lens"],
                                  attn_bias=x["bias"], sinks=x["sinks"], backend=backend, **local)
    return fwd, x["dout"], leaves(x)


def _window_mask(case: Case, x: dict, device: str):
    """The dense bool [L, L] mask of causal local attention (True = attend: i − w <= j <= i), built once per row
    and shared by the SDPA providers; Skip when it (and the float copy SDPA's kernels may make of it) would not fit."""
    if "window_mask" not in x:
        need = case.Lq * case.Lk * (1 + torch.tensor([], dtype=case.dtype).element_size())
        free = torch.cuda.mem_get_info(torch.device(device))[0] if common.is_cuda(device) else SCORES_CAP
        if need > free:
            raise Skip(f"the dense {case.Lq}×{case.Lk} window mask (+ its float copy) needs {need / 1e9:.1f} GB, "
                       f"{free / 1e9:.1f} GB free")
        i = torch.arange(case.Lq, device=device).view(-1, 1)
        j = torch.arange(case.Lk, device=device).view(1, -1)
        x["window_mask"] = (j <= i) & (j >= i - case.window)
    return x["window_mask"]


def _sdpa_mask(case: Case, x: dict):
    """SDPA's attn_mask (bool True = attend, or the float bias) and is_causal for this case."""
    if case.window:
        return x["window_mask"], False
    mask = x["attend"] if x["attend"] is not None else x["bias"]
    if case.causal and mask is not None:
        tril = torch.ones(case.Lq, case.Lk, dtype=torch.bool, device=mask.device).tril()
        mask = (mask & tril) if mask.dtype == torch.bool else mask.masked_fill(~tril, float("-inf"))
        return mask, False
    return mask, case.causal


def make_sdpa(case: Case, x: dict, device: str, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if case.sinks:
        raise Skip("SDPA takes no sink logits")
    if backend == "sdpa-math":
        _check_unfused(case, "sdpa-math")
    which = getattr(SDPBackend, SDPA[backend])
    gqa = {"enable_gqa": True} if case.Hkv != case.H else {}
    if case.window:
        if backend == "sdpa-flash":
            raise Skip("sdpa-flash takes no attn_mask (a sliding window needs the dense mask)")
        _window_mask(case, x, device)

    mask, causal = _sdpa_mask(case, x)

    def fwd():
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=mask, is_causal=causal, **gqa)
    return fwd, x["dout"], leaves(x)


def make_flex(case: Case, x: dict, device: str, mode: str):
    if case.sinks:
        raise Skip("FlexAttention takes no sink logits")
    common.require_compile(device, mode, case.compiled)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    kv_lens, bias, causal, window = x["kv_lens"], x["bias"], case.causal, case.window

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (q_idx >= kv_idx) if causal else (q_idx >= 0)
        if window:
            ok = ok & (q_idx - kv_idx <= window)
        return ok & (kv_idx < kv_lens[b]) if kv_lens is not None else ok

    block_mask = None
    if causal or kv_lens is not None:
        block_mask = create_block_mask(mask_mod, case.B if kv_lens is not None else None, None, case.Lq, case.Lk,
                                       device=device)
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    flex = common.compiled(flex_attention)
    gqa = {"enable_gqa": True} if case.Hkv != case.H else {}

    def fwd():
        return flex(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask, **gqa)
    return fwd, x["dout"], leaves(x)


def make_reference(case: Case, x: dict, device: str, compile_mode: Optional[str]):
    from fastattn import reference
    _check_unfused(case, "unfused reference")
    if compile_mode is not None:
        common.require_compile(device, compile_mode, case.compiled)

    window = (case.window, 0) if case.window else (-1, -1)

    def ref(q, k, v, bias, kv_lens, sinks):
        return reference.attention(q, k, v, causal=case.causal, attn_bias=bias, kv_lens=kv_lens, window_size=window,
                                   sinks=sinks)
    fn = common.compiled(ref) if compile_mode is not None else ref
    return lambda: fn(x["q"], x["k"], x["v"], x["bias"], x["kv_lens"], x["sinks"]), x["dout"], leaves(x)


# Decoding rows also time each backend's forward with one of its decoding heuristics forced off: what each gains.
ABLATIONS = {"fastattn-triton-nosplit": ("fastattn-triton", "forced_splits", 1),
             "fastattn-triton-nopack": ("fastattn-triton", "forced_pack_gqa", False),
             "fastattn-cuda-nosplit": ("fastattn-cuda", "forced_splits", 1),
             "fastattn-cuda-nopack": ("fastattn-cuda", "forced_pack_gqa", False)}


def make_ablation(case: Case, x: dict, device: str, name: str):
    """A fastattn backend with split-KV ("-nosplit") or packed GQA ("-nopack") forced off."""
    from fastattn.triton import attention as kernels
    backend, force, value = ABLATIONS[name]
    fwd, dout, grads = make_fastattn(case, x, device, backend)

    def fwd_forced():
        with getattr(kernels, force)(value):
            return fwd()
    return fwd_forced, dout, grads


def makers(case: Case, x: dict, device: str, mode: str) -> dict:
    out = {b: (lambda b=b: make_fastattn(case, x, device, b)) for b in FASTATTN}
    if case.kind == "decode":
        out.update({n: (lambda n=n: make_ablation(case, x, device, n)) for n in ABLATIONS})
    out.update({b: (lambda b=b: make_sdpa(case, x, device, b)) for b in SDPA})
    out["flex-compiled"] = lambda: make_flex(case, x, device, mode)
    out["ref-compiled"] = lambda: make_reference(case, x, device, mode)
    out["ref-eager"] = lambda: make_reference(case, x, device, None)
    return out


# ------------------------------------------------------------------------------------------------ run
def run_case(case: Case, device: str, mode: str, timer: common.Timer) -> dict:
    if case.gpu_only:
        common.require_cuda(device, f"{case.name} (a GPU-sized row)")
    row = case.to_json()
    try:
        x = inputs(case, device)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the row is recorded, the run goes on
        row["results"] = common.skipped_row(common.reason_of(e), PROVIDERS, PASSES)
        return row
    results = {name: common.time_passes(make, case.passes, timer).to_json()
               for name, make in makers(case, x, device, mode).items()}
    del x
    common.free_memory(device)
    for res in results.values():
        res["tflops"] = {p: (case.flops(p) / (ms * 1e-3) / 1e12 if ms else None) for p, ms in res["ms"].items()}
    row["results"] = results
    row["best_other"], row["ratio"] = common.best_and_ratios(results, FASTATTN, OTHERS, case.passes)
    if case.window:
        tokens = case.B * case.Lq
        for res in results.values():
            res["ns_per_token"] = {p: (ms * 1e6 / tokens if ms else None) for p, ms in res["ms"].items()}
        row["vs_sdpa_mask"] = common.best_and_ratios(results, FASTATTN, tuple(SDPA), PASSES)[1]
    return row


def tables(rows: list) -> list:
    t = common.Table("attention TFLOPS (ratio = fastattn ÷ best other)",
                     ["case", "pass", *(SHORT[p] for p in PROVIDERS), "best other", "triton÷best", "cuda÷best"])
    for r in rows:
        for p in (("fwd",) if r["kind"] == "decode" else PASSES):  # decoding rows time the forward only
            res = r["results"]
            best = (r.get("best_other") or {}).get(p)
            ratio = (r.get("ratio") or {}).get(p, {})
            t.add(r["case"] if p == "fwd" else "", p,
                  *(common.fmt(res[prov].get("tflops", {}).get(p)) for prov in PROVIDERS),
                  SHORT.get(best, "-"), common.fmt(ratio.get("fastattn-triton"), ".2f"),
                  common.fmt(ratio.get("fastattn-cuda"), ".2f"))
    return [t] + ([window_table(rows)] if any(r.get("window") for r in rows) else []) + (
        [decode_table(rows)] if any(r["kind"] == "decode" for r in rows) else [])


def decode_table(rows: list) -> "common.Table":
    """Decoding rows: µs per call, K/V read GB/s, and what the forward's split-KV and packed GQA gain."""
    cols = ("fastattn-triton", "fastattn-triton-nosplit", "fastattn-triton-nopack", "fastattn-cuda",
            "fastattn-cuda-nosplit", "fastattn-cuda-nopack", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
            "flex-compiled")
    t = common.Table("decoding (Lq = 1; Lq 4: speculative decoding; forward): µs per call; GB/s = K/V bytes ÷ time; "
                     "split / pack gain = the backend without split-KV / packed GQA ÷ with; ratio = best other ÷ "
                     "fastattn",
                     ["case", *(SHORT.get(c, c.replace("fastattn-", "").replace("-no", " no-")) for c in cols),
                      "triton GB/s", "split gain", "pack gain", "cuda split gain", "cuda pack gain", "best other",
                      "triton÷best", "cuda÷best"])
    for r in rows:
        if r["kind"] != "decode":
            continue
        res = r["results"]
        us = {c: (res.get(c, {}).get("ms", {}).get("fwd") or 0) * 1e3 or None for c in cols}
        tri = us["fastattn-triton"]
        gbps = r["kv_bytes"] / (tri * 1e-6) / 1e9 if tri else None
        gains = (us[c] / us[ABLATIONS[c][0]] if us[ABLATIONS[c][0]] and us[c] else None for c in ABLATIONS)
        ratio = (r.get("ratio") or {}).get("fwd", {})
        t.add(r["case"], *(common.fmt(us[c]) for c in cols), common.fmt(gbps), *(common.fmt(g, ".2f") for g in gains),
              SHORT.get((r.get("best_other") or {}).get("fwd"), "-"), common.fmt(ratio.get("fastattn-triton"), ".2f"),
              common.fmt(ratio.get("fastattn-cuda"), ".2f"))
    return t


def window_table(rows: list) -> "common.Table":
    """ns per query token of the sliding-window rows, speed-up over SDPA with the dense mask, flatness in L."""
    cols = ("fastattn-triton", "fastattn-cuda", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex-compiled")
    t = common.Table("sliding-window attention (causal, window (w, 0)): ns per query token; ×sdpa-mask = best "
                     "SDPA-with-mask ÷ fastattn; flat = ns/token ÷ that at the smallest L",
                     ["case", "w", "L", "pass", *(SHORT[c] for c in cols), "triton×sdpa-mask", "cuda×sdpa-mask",
                      "triton flat", "cuda flat"])
    first: dict = {}
    for r in rows:
        if not r.get("window"):
            continue
        for p in PASSES:
            res, vs = r["results"], (r.get("vs_sdpa_mask") or {}).get(p, {})
            ns = {c: res[c].get("ns_per_token", {}).get(p) for c in cols}
            flat = []
            for f in FASTATTN:
                key = (r["dtype"], r["window"], p, f)
                if first.get(key) is None:  # rows come in increasing L: the first timed one is the base
                    first[key] = ns[f]
                base = first[key]
                flat.append(common.fmt(ns[f] / base if ns[f] and base else None, ".2f"))
            t.add(r["case"] if p == "fwd" else "", r["window"], r["Lq"], p, *(common.fmt(ns[c]) for c in cols),
                  common.fmt(vs.get("fastattn-triton"), ".2f"), common.fmt(vs.get("fastattn-cuda"), ".2f"), *flat)
    return t


def plots(rows: list, out_dir, env: dict) -> list:
    groups: dict = {}
    for r in rows:
        if r["kind"] == "sweep":
            groups.setdefault((r["dtype"], r["D"], r["causal"]), []).append(r)
    names = []
    windows: dict = {}
    for r in rows:
        if r.get("window"):
            windows.setdefault((r["dtype"], r["window"]), []).append(r)
    for (dtype, w), rs in windows.items():
        if len(rs) < 2:
            continue
        panels = [(p, {prov: [(r["Lq"], r["results"][prov].get("ns_per_token", {}).get(p)) for r in rs]
                       for prov in PROVIDERS}) for p in PASSES]
        name = common.plot_lines(out_dir / f"attention_window{w}_{dtype}.png",
                                 f"sliding-window attention {dtype}, causal window ({w}, 0), d{rs[0]['D']}, "
                                 f"H={rs[0]['H']} — {env['device']}, torch {env['torch']}, {env['date'][:10]}",
                                 panels, "sequence length", "ns per query token", logy=True)
        if name:
            names.append(name)
    for (dtype, D, causal), rs in groups.items():
        if len(rs) < 2:
            continue
        panels = []
        for p in PASSES:
            series = {prov: [(r["Lq"], r["results"][prov].get("tflops", {}).get(p)) for r in rs]
                      for prov in PROVIDERS}
            panels.append((p, series))
        tag = f"{dtype}_d{D}_{'causal' if causal else 'full'}"
        tokens = sorted({r["B"] * r["Lq"] for r in rs})
        name = common.plot_lines(out_dir / f"attention_{tag}.png",
                                 f"attention {dtype} d{D} {'causal' if causal else 'non-causal'}, H={rs[0]['H']}, "
                                 f"B·L={tokens[0] if len(tokens) == 1 else tokens} — {env['device']}, "
                                 f"torch {env['torch']}, {env['date'][:10]}", panels, "sequence length", "TFLOPS")
        if name:
            names.append(name)
    return names


def main(argv=None) -> int:
    with common.session(common.first_paragraph(__doc__), argv, 240,
                        "fastattn, FlexAttention and torch.compile rows are "
                        "skipped (reason in each row); the CPU grid runs the reference and SDPA at toy sizes in "
                        "fp32", rehearse=True) as s:
        args, env, out_dir, timer, budget, gpu = s.args, s.env, s.out_dir, s.timer, s.budget, s.gpu
        rows = []
        for case in common.progress(grid(args.mode, gpu), NAME):
            try:
                budget.check()
                rows.append(run_case(case, args.device, args.mode, timer))
            except Skip as e:
                rows.append({**case.to_json(), "results": common.skipped_row(str(e), PROVIDERS, PASSES)})
            common.report(NAME, args, env, tables(rows), NOTES, rows, [], out_dir, partial=True)
        notes = NOTES + common.notes_from_reasons(common.reasons_by_provider([r["results"] for r in rows]))
        pngs = [] if args.no_plots else plots(rows, out_dir, env)
        common.report(NAME, args, env, tables(rows), notes, rows, pngs, out_dir,
                      {"flop_convention": NOTES[0], "elapsed_s": round(budget.elapsed(), 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
