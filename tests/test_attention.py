"""The attention kernels (Triton; the `gpu` tests also CUDA C++)
against the float64 reference under DESIGN.md §5, forward and every gradient.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (tiny shapes, fp16/fp32); the `gpu` tests run
the same checks larger and in bf16 on CUDA.
"""
import itertools
import math

import pytest
import torch
import triton
import triton.language as tl

import fastattn
from fastattn.triton import attention as A
from fastattn.testing import (BACKWARD_FACTOR, AttentionCase, attention_problem, check_close, compare_all,
                              forward_backward, random_qkv, run_attention_case)

import conftest
from conftest import DEVICE, HAS_CUDA

DTYPES = [torch.float16, torch.float32]


def assert_case(case, device=DEVICE, backend="triton"):
    conftest.assert_case(run_attention_case, case, device, backend)


# ------------------------------------------------------------------------------------------- shapes
SHAPES = [(1, 1), (17, 17), (113, 113), (17, 113), (113, 17), (1, 113), (113, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_lengths(Lq, Lk, causal, dtype):
    assert_case(AttentionCase(Lq=Lq, Lk=Lk, D=32, dtype=dtype, causal=bool(causal),
                              alignment=causal or "top_left", seed=Lq * 1000 + Lk))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 40, 64, 80, 111, 128, 256])
def test_head_dims(D, dtype):
    assert_case(AttentionCase(B=1, H=2, Lq=40, Lk=50, D=D, dtype=dtype, causal=True, seed=D))


def test_long_sequence():
    """One length past a thousand with several blocks each way, causal (block skipping on the diagonal)."""
    assert_case(AttentionCase(B=1, H=1, Lq=1023, Lk=1023, D=16, causal=True, seed=7))


# ------------------------------------------------------------------------------------------- masks
MASKS = {
    "kv_lens": dict(kv_lens=True),
    "key_padding": dict(key_padding=True),
    "mask-full": dict(bool_mask="full"),
    "mask-2d": dict(bool_mask="2d"),
    "kv_lens+causal-br": dict(kv_lens=True, causal=True, alignment="bottom_right"),
    "key_padding+causal": dict(key_padding=True, causal=True),
    "mask+kv_lens+causal": dict(bool_mask="full", kv_lens=True, causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(70, 70), (40, 100), (100, 40)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks(mask, Lq, Lk, dtype):
    assert_case(AttentionCase(B=3, Lq=Lq, Lk=Lk, dtype=dtype, seed=hash(mask) % 1000 + Lq, **MASKS[mask]))


def assert_bias_grad_allocates_no_score_sized_buffer(monkeypatch, device, backend, dtype, B=3, H=2, Lq=70, Lk=48,
                                                     seed=0):
    """The gradient of a bias broadcast over the batch (and of one broadcast over the heads and the queries) is
    reduced in the kernels: the backward allocates nothing of B·H·Lq·Lk elements (torch's factory functions are
    watched while it runs), and the gradient meets the §5 rule."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(B, H, Lq, Lk, 32, dtype=dtype, device=device, generator=g)
    for shape in ((1, H, Lq, Lk), (B, 1, 1, Lk)):
        bias = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
        out = fastattn.attention(q, k, v, attn_bias=bias, backend=backend)
        sizes = []
        with monkeypatch.context() as m:
            for name in ("zeros", "empty", "zeros_like", "empty_like", "full"):
                make = getattr(torch, name)

                def watched(*args, _make=make, **kwargs):
                    t = _make(*args, **kwargs)
                    sizes.append(t.numel())
                    return t
                m.setattr(torch, name, watched)
            dbias, = torch.autograd.grad(out.square().sum(), bias)
        assert sizes and max(sizes) < B * H * Lq * Lk, shape
        refs = []
        for t in (torch.float64, dtype):
            leaf = bias.detach().to(t).requires_grad_()
            ref_out = fastattn.reference.attention(q.detach().to(t), k.detach().to(t), v.detach().to(t),
                                                   attn_bias=leaf)
            refs.append(torch.autograd.grad(ref_out.square().sum(), leaf)[0])
        check_close(dbias, *refs, factor=BACKWARD_FACTOR, name=f"dbias {shape}")


@pytest.mark.parametrize("seed", [0, 1])
def test_broadcast_bias_grad_allocates_no_score_sized_buffer(monkeypatch, seed):
    assert_bias_grad_allocates_no_score_sized_buffer(monkeypatch, DEVICE, "triton", torch.float32, seed=seed)


def test_broadcast_bias_grad_long_sum(monkeypatch):
    """A per-key bias over 8 heads and 400 queries: each entry of its gradient sums 3200 terms (fails with fp32
    sums in the broadcast-dbias kernel)."""
    assert_bias_grad_allocates_no_score_sized_buffer(monkeypatch, DEVICE, "triton", torch.float32, B=2, H=8,
                                                     Lq=400, Lk=40, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", ["full", "heads", "batch", "2d", "rows", "head"])
@pytest.mark.parametrize("grad", [False, True])
def test_bias(bias, grad, dtype):
    """Every broadcast pattern; the gradient of a broadcast bias is reduced inside the kernels."""
    assert_case(AttentionCase(B=2, H=2, Lq=45, Lk=70, dtype=dtype, bias=bias, bias_grad=grad, causal=grad,
                              alignment="bottom_right", seed=len(bias) + grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (6, 3)])
def test_gqa(H, Hkv, dtype):
    assert_case(AttentionCase(B=2, H=H, Hkv=Hkv, Lq=50, Lk=70, dtype=dtype, kv_lens=True, causal=True, seed=H * Hkv))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (19, 1), (1, 3, 1, 1), (2, 3, 19, 1)])
@pytest.mark.parametrize("lse_grad", [False, True])
def test_bias_of_one_key_column_grad_is_the_lse_grad(shape, lse_grad, kernel_backend):
    """A bias constant along the keys shifts a row's scores alike: the softmax ignores it and the LSE takes it
    whole, so its gradient is Σ dLSE over its broadcast dims, 0 without an LSE gradient (fp16 summed ds, which
    cancels only up to the rounded output's error: 9 times the reference's for a scalar bias) — exactly, rows
    without a visible key adding 0."""
    B, H, Lq, Lk = 2, 3, 19, 23
    q, k, v = random_qkv(B, H, Lq, Lk, 32, device=DEVICE, requires_grad=True)
    kv_lens = torch.tensor([Lk, 0], dtype=torch.int32, device=DEVICE)
    bias = torch.randn(shape, device=DEVICE).to(q.dtype).requires_grad_()
    out, lse = fastattn.attention(q, k, v, attn_bias=bias, kv_lens=kv_lens, return_lse=True, backend=kernel_backend)
    dlse = torch.randn_like(lse) if lse_grad else torch.zeros_like(lse)
    dbias, = torch.autograd.grad((out, lse), bias, (torch.randn_like(out), dlse))
    full_shape = (1,) * (4 - len(shape)) + shape
    want = torch.where(torch.isinf(lse), 0.0, dlse.double()).unsqueeze(-1)
    for d in range(3):
        want = want.sum(d, keepdim=True) if full_shape[d] == 1 else want
    torch.testing.assert_close(dbias.double(), want.view(shape), rtol=1e-3, atol=1e-3)
    assert lse_grad or (dbias == 0).all()


@pytest.mark.parametrize("D,Dv", [(48, 32), (32, 80)])
def test_value_head_dim_differs(D, Dv, kernel_backend):
    """v's head dim may differ from q's and k's, as SDPA allows (multi-head latent attention: 192 and 128): the
    kernels run the narrower side zero-padded; out [.., Dv], LSE and every gradient within the rule, GQA, causal
    and kv_lens on; scaled_dot_product_attention gives torch's result."""
    g = torch.Generator().manual_seed(D + Dv)
    B, H, Hkv, Lq, Lk = 2, 4, 2, 21, 30
    inputs = dict(q=torch.randn(B, H, Lq, D, generator=g), k=torch.randn(B, Hkv, Lk, D, generator=g),
                  v=torch.randn(B, Hkv, Lk, Dv, generator=g))
    inputs = {n: t.to(DEVICE).requires_grad_() for n, t in inputs.items()}
    kv_lens = torch.tensor([Lk, 17], dtype=torch.int32, device=DEVICE)
    gouts = {"out": torch.randn(B, H, Lq, Dv, generator=g).to(DEVICE),
             "lse": torch.randn(B, H, Lq, generator=g).to(DEVICE)}

    def fn(backend, **kw):
        out, lse = fastattn.attention(**kw, causal=True, kv_lens=kv_lens, return_lse=True, backend=backend)
        return {"out": out, "lse": lse}
    failed = [str(c) for c in compare_all(fn, inputs, gouts, torch.float16, kernel_backend) if not c.ok]
    assert not failed, "\n".join(failed)
    q, k, v = (t.detach().half() for t in inputs.values())
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                               torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                                is_causal=True).half(),
                               rtol=2e-3, atol=2e-3)
    out = fastattn.attention(q, k, v, backend=kernel_backend)
    assert out.shape[-1] == Dv and out.is_contiguous()  # dense, as torch's: no view of a D-wide buffer


def test_value_head_dim_differs_varlen(kernel_backend):
    """A packed batch whose v has another head dim than q and k, as the padded layout allows: every output and
    gradient within the rule (GQA, bottom-right causal, an empty sequence)."""
    g = torch.Generator().manual_seed(3)
    H, Hkv, D, Dv = 4, 2, 24, 40
    lens_q, lens_k = [7, 0, 12], [9, 5, 12]
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=DEVICE)
                  for n in (lens_q, lens_k))
    inputs = dict(q=torch.randn(sum(lens_q), H, D, generator=g), k=torch.randn(sum(lens_k), Hkv, D, generator=g),
                  v=torch.randn(sum(lens_k), Hkv, Dv, generator=g))
    inputs = {n: t.to(DEVICE).requires_grad_() for n, t in inputs.items()}
    gouts = {"out": torch.randn(sum(lens_q), H, Dv, generator=g).to(DEVICE)}

    def fn(backend, **kw):
        return {"out": fastattn.attention(**kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                                          max_seqlen_k=max(lens_k), causal=True, causal_alignment="bottom_right",
                                          backend=backend)}
    failed = [str(c) for c in compare_all(fn, inputs, gouts, torch.float16, kernel_backend) if not c.ok]
    assert not failed, "\n".join(failed)


def test_sdpa_three_dim_inputs_hold_heads():
    """(H, L, D) inputs, as torch reads them: dim -3 holds the heads, so enable_gqa groups them (it once read
    them as batches and refused); a 3-D mask broadcasts over those heads."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, L, 16, generator=g).to(DEVICE) for n, L in ((4, 5), (2, 7), (2, 7)))
    mask = torch.rand(4, 5, 7, generator=g).to(DEVICE) > 0.3
    for kw in (dict(), dict(attn_mask=mask), dict(is_causal=True)):
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                                                **{n: m for n, m in kw.items()})
        got = fastattn.scaled_dot_product_attention(q.half(), k.half(), v.half(), enable_gqa=True, **kw)
        assert got.shape == (4, 5, 16)
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


def test_sdpa_batch_dims_broadcast(kernel_backend, monkeypatch):
    """As torch's SDPA: every dim of query, key and value but (L, D) broadcasts (one K/V shared by a batch of
    queries or by every query head, or the reverse), 3-D to 5-D; with enable_gqa the dims before the heads, and K
    and V may group differently. The gradients of a broadcast input are summed over its copies."""
    monkeypatch.setenv("FASTATTN_BACKEND", kernel_backend)
    g = torch.Generator().manual_seed(5)
    cases = [((3, 2), (1, 2), (1, 2), False), ((1, 2), (2, 2), (2, 2), False), ((2, 1, 2), (1, 3, 2), (1, 3, 2), False),
             ((2, 3), (2, 1), (2, 1), False), ((1, 1), (2, 3), (2, 3), False), ((3,), (1,), (3,), False),
             ((2, 4), (1, 2), (1, 1), True), ((6,), (3,), (2,), True)]
    for qb, kb, vb, gqa in cases:
        q = torch.randn(*qb, 6, 16, generator=g).half().to(DEVICE).requires_grad_()
        k = torch.randn(*kb, 9, 16, generator=g).half().to(DEVICE).requires_grad_()
        v = torch.randn(*vb, 9, 16, generator=g).half().to(DEVICE).requires_grad_()
        got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                                enable_gqa=gqa)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
        gout = torch.randn(want.shape, generator=g).to(DEVICE)
        grads = (torch.autograd.grad(out, (q, k, v), gout.to(out.dtype)) for out in (got, want))
        for a, b in zip(*grads):
            assert a.shape == b.shape
            torch.testing.assert_close(a.double(), b.double(), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_gradient(dtype):
    assert_case(AttentionCase(Lq=50, Lk=40, dtype=dtype, lse_grad=True, kv_lens=True, bias="heads", bias_grad=True))


@pytest.mark.parametrize("seed", [0, 7])
def test_lse_gradient_of_rows_with_one_key(seed):
    """A row that sees one key has ds = dlse exactly (its softmax part is 0): the fp32 D = dp − dlse, rounded to
    fp32, left ds = dp − fl(D) off by up to ulp(dp), dq and dk 3.7–4.7 times the reference's error."""
    assert_case(AttentionCase(B=1, H=2, Lq=1, Lk=1, D=16, dtype=torch.float32, lse_grad=True, seed=seed))
    assert_case(AttentionCase(varlen=((1, 1), (3, 2)), H=2, D=16, dtype=torch.float32, lse_grad=True, seed=seed))


def test_strided_lse_gradient(kernel_backend):
    """The LSE's gradient as autograd hands it may be strided (here from a permuted weight): same gradients as
    from the same values laid out densely (the fp16 delta kernel once read it densely: dq off by 1)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 2, 2, generator=g).to(DEVICE).permute(2, 1, 0)  # (B, H, Lq), not contiguous
    grads = []
    for weight in (w, w.contiguous()):
        q, k, v = random_qkv(2, 2, 9, 12, 32, dtype=torch.float16, device=DEVICE, generator=torch.Generator()
                             .manual_seed(1))
        _, lse = fastattn.attention(q, k, v, return_lse=True, backend=kernel_backend)
        grads.append(torch.autograd.grad((lse * weight).sum(), (q, k)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [10.0, 30.0])
def test_large_logits(scale, dtype):
    assert_case(AttentionCase(Lq=50, Lk=60, dtype=dtype, logit_scale=scale, causal=True, seed=int(scale)))


@pytest.mark.parametrize("name,extra", [
    ("causal", dict(B=2, H=2, Lq=50, Lk=50, D=64, causal=True)),
    ("cross", dict(B=2, H=2, Lq=33, Lk=65, D=40)),
    ("padding-dropout-gqa", dict(B=2, H=4, Hkv=2, Lq=40, Lk=70, D=32, key_padding=True, dropout=0.2)),
])
def test_fp32_score_gradient_rows_sum_to_zero(name, extra):
    """Adding a constant to a row of scores leaves the softmax unchanged, so Σ_j ds_ij = 0 (the gradient of a
    per-row bias). The fp32 backward keeps it at least as closely as the fp32 reference, whose softmax backward
    uses normalised p: it forms D_i = Σ_j p_ij dp_ij / Σ_j p_ij from its own p and dp. With D_i = do_i·o_i (o
    carries the forward's error) they reached 3.6 times the reference's, and dk and dbias missed the rule."""
    for seed in range(4):
        case = AttentionCase(seed=seed, dtype=torch.float32, bias="full", bias_grad=True, **extra)
        fn, inputs, gouts = attention_problem(case, DEVICE)
        # the kernel runs first: it draws the dropout mask that the reference replays
        kernel, reference = (
            forward_backward(lambda **kw: fn(backend=backend, **kw), inputs, gouts, torch.float32)["dattn_bias"]
            .double().sum(-1).abs().max().item() for backend in ("triton", "torch"))
        assert kernel <= reference, f"{name} seed {seed}: max |Σ_j dbias_ij| {kernel:.3e} > reference's {reference:.3e}"


@triton.jit
def _fp32_exponentials_kernel(X, E2, EN, N: tl.constexpr):
    x = tl.load(X + tl.arange(0, N))
    tl.store(E2 + tl.arange(0, N), A._exp2(x, True))
    tl.store(EN + tl.arange(0, N), A._exp_neg(-tl.abs(x), True))


@triton.jit
def _two_sum_kernel(Acc, X, S, Lo, N: tl.constexpr):
    s, lo = A._two_sum(tl.load(Acc + tl.arange(0, N)), tl.zeros([N], tl.float32), tl.load(X + tl.arange(0, N)))
    tl.store(S + tl.arange(0, N), s)
    tl.store(Lo + tl.arange(0, N), lo)


def test_two_sum_is_exact():
    """The fp32 kernels' compensated running sums: s + lo = acc + x exactly, s = fl(acc + x), for addends of any
    relative size and sign (on a GPU: as compiled for the fp32 kernels, without FMA contraction)."""
    g = torch.Generator().manual_seed(1)
    n = 4096
    acc = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    x[:64] = -acc[:64]  # exact cancellation
    s, lo = torch.empty(n, device=DEVICE), torch.empty(n, device=DEVICE)
    _two_sum_kernel[(1,)](acc.to(DEVICE), x.to(DEVICE), s, lo, N=n, **A.FP32_OPTIONS)
    s, lo = s.cpu(), lo.cpu()
    assert torch.equal(s, acc + x)
    assert torch.equal(s.double() + lo.double(), acc.double() + x.double())


def test_fp32_exponentials_within_an_ulp():
    """The fp32 kernels' 2^x (softmax weights) and e^x, x <= 0 (soft cap), against float64: within 1.25 ulp of the
    fp32 result over the arguments that matter, 0 where it is below fp32's normal range (as the kernels expect).
    On a GPU this checks the compiled code, where tl.math.exp2 / tl.exp would be ex2.approx.f32 (up to 2 ulp,
    and e^x's argument rounded after scaling by log2(e): an error growing with |x|)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    x = torch.cat([torch.rand(n // 2, generator=g) * 128 - 126,  # every exponent 2^x reaches
                   torch.randn(n // 2, generator=g) * 4]).to(torch.float32)
    e2, en = torch.empty_like(x), torch.empty_like(x)
    _fp32_exponentials_kernel[(1,)](x.to(DEVICE), e2_dev := e2.to(DEVICE), en_dev := en.to(DEVICE), N=n,
                                    **A.FP32_OPTIONS)  # compiled as the fp32 attention kernels are
    for got, want in ((e2_dev.cpu(), torch.exp2(x.double())), (en_dev.cpu(), torch.exp(-x.double().abs()))):
        normal = want >= torch.finfo(torch.float32).tiny * 2
        ulp = torch.exp2(torch.floor(torch.log2(want[normal])) - 23)
        err = ((got[normal].double() - want[normal]).abs() / ulp).max().item()
        assert err <= 1.25, f"max error {err:.2f} ulp"
        assert (got[want < torch.finfo(torch.float32).tiny / 2] == 0).all()


def test_fp32_large_scores_weights_sum_to_one():
    """With do = 1, Σ_j dv_j = Σ_i Σ_j p_ij = the number of rows. At scores around 100 the fp32 backward keeps that
    within 3 times the fp32 reference's error: its weights are e^(s − r) in natural units, scaled per row by the
    D pass's 1 / Σ_j e^(s_ij − r_i). Base-2 scores, 2^(s·log2(e) − lse2), erred by |s|·2⁻²⁴ in each exponent plus
    lse2's rounding in every weight of a row: 4.7 to 16 times the reference's error here, and dv missed the rule
    at such scores (README, Numerics)."""
    for seed in range(4):
        q, k, v = random_qkv(2, 2, 33, 70, 32, dtype=torch.float32, device=DEVICE,
                             generator=torch.Generator().manual_seed(seed))
        errors = []
        for backend in ("triton", "reference"):
            qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q * 12.0, k, v))
            out = fastattn.attention(qs, ks, vs, causal=True, backend=backend)
            (dv,) = torch.autograd.grad(out, vs, torch.ones_like(out))
            errors.append((dv.double().sum(2) - 33).abs().max().item())
        assert errors[0] <= 3 * errors[1], f"seed {seed}: |Σ dv − Lq| {errors[0]:.2e}, reference's {errors[1]:.2e}"


# ------------------------------------------------------------------------------------------- empty rows
def test_fully_masked_rows_are_zero_never_nan(device, kernel_backend):
    """Rows with no visible key: output 0, LSE +inf, every gradient 0 (and finite) — for each way to get one."""
    B, H, Lq, Lk, D = 2, 2, 40, 24, 32
    q, k, v = random_qkv(B, H, Lq, Lk, D, device=device)
    kv_lens = torch.tensor([Lk, 0], dtype=torch.int32, device=device)
    kpm = torch.zeros(B, Lk, dtype=torch.bool, device=device)
    kpm[1] = True
    bias = torch.zeros(B, H, Lq, Lk, device=device, dtype=q.dtype)
    bias[1] = float("-inf")
    variants = {
        "kv_lens": dict(kv_lens=kv_lens),
        "key_padding": dict(key_padding_mask=kpm),
        "bool mask": dict(attn_bias=~kpm.view(B, 1, 1, Lk)),
        "-inf bias": dict(attn_bias=bias),
        "bottom-right, Lq > Lk": dict(causal=True, causal_alignment="bottom_right"),
    }
    for name, kw in variants.items():
        out, lse = fastattn.attention(q, k, v, return_lse=True, backend=kernel_backend, **kw)
        empty = torch.isinf(lse)
        assert empty.any(), name
        assert torch.isfinite(out).all(), name
        assert (out[empty] == 0).all(), name
        assert (lse[empty] > 0).all(), name  # +inf
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for g in grads:
            assert torch.isfinite(g).all(), name
        dq = grads[0]
        assert (dq[empty] == 0).all(), name


def test_fp32_rows_hidden_by_a_finfo_min_bias():
    """An additive mask of torch.finfo(float32).min (finite: Hugging Face's eager masks) is a score like any other:
    a row that it hides entirely averages v uniformly with LSE ≈ −3.4e38, as in the reference (its lse2 =
    lse·log2(e) overflows fp32: saved in fp32, it was −inf and every gradient NaN), and a partly hidden row
    ignores those keys; output, LSE and every gradient (bias's too) within the rule. With a gradient on the LSE the
    reference itself fails there (its lse rounds to the scores, so e^(s − lse) = 1 for each key instead of 1/Lk):
    the kernels' bias gradient must still sum, over the hidden row, to the LSE's gradient (Σ_j ∂lse/∂s_j = 1)."""
    B, H, Lq, Lk, D = 2, 2, 9, 13, 16
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(B, 1, Lq, Lk, generator=g)
    bias[0, :, 0] = torch.finfo(torch.float32).min
    bias[1, :, 2, 5:] = torch.finfo(torch.float32).min
    inputs = dict(q=torch.randn(B, H, Lq, D, generator=g), k=torch.randn(B, H, Lk, D, generator=g),
                  v=torch.randn(B, H, Lk, D, generator=g), attn_bias=bias)
    inputs = {n: t.to(DEVICE).requires_grad_() for n, t in inputs.items()}
    gouts = {"out": torch.randn(B, H, Lq, D, generator=g).to(DEVICE),
             "lse": torch.randn(B, H, Lq, generator=g).to(DEVICE)}

    def fn(backend, **kw):
        out, lse = fastattn.attention(**kw, return_lse=True, backend=backend)
        return {"out": out, "lse": lse}
    got = forward_backward(lambda **kw: fn("triton", **kw), inputs, gouts, torch.float32)
    assert got["lse"][0, :, 0].max() < -3e38 and torch.isfinite(got["lse"]).all()
    assert all(torch.isfinite(got[n]).all() for n in ("dq", "dk", "dv", "dattn_bias"))
    dbias_row = got["dattn_bias"][0, 0, 0].double().sum()
    assert abs(dbias_row - gouts["lse"][:, :, 0][0].double().sum()) < 1e-5, dbias_row
    failed = [str(c) for c in compare_all(fn, inputs, dict(gouts, lse=None), torch.float32, "triton") if not c.ok]
    assert not failed, "\n".join(failed)


def test_padding_keys_are_never_read(device):
    """Keys past kv_lens may hold garbage (NaN) without touching the result: their blocks are skipped
    and partial blocks are masked on load."""
    q, k, v = random_qkv(2, 2, 30, 100, 32, device=device)
    kv_lens = torch.tensor([37, 70], dtype=torch.int32, device=device)
    kp, vp = k.detach().clone(), v.detach().clone()
    for b, n in enumerate(kv_lens.tolist()):
        kp[b, :, n:] = float("nan")
        vp[b, :, n:] = float("nan")
    kp.requires_grad_()
    vp.requires_grad_()
    out = fastattn.attention(q, kp, vp, kv_lens=kv_lens, backend="triton")
    ref = fastattn.attention(q, k, v, kv_lens=kv_lens, backend="triton")
    assert torch.equal(out, ref)
    dq, dk, dv = torch.autograd.grad(out, (q, kp, vp), torch.ones_like(out))
    assert torch.isfinite(dq).all()
    for b, n in enumerate(kv_lens.tolist()):
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()


def _visits(q, k, v, **kw):
    """Key blocks computed per program of the forward, dK/dV and dQ kernels (dict of int32 tensors), and out."""
    from fastattn.ops.common import empty_like
    from fastattn.triton import attention as kernels

    B, H, Lq, D = q.shape
    args = dict(bias=None, mask=None, kv_lens=None, scale=D ** -0.5, causal=False, bottom_right=False)
    args.update(kw)
    out, lse, count = empty_like(q), torch.empty(B, H, Lq, device=q.device), {}
    kernels.forward(q, k, v, args["bias"], args["mask"], args["kv_lens"], out, lse, args["scale"], args["causal"],
                    args["bottom_right"], count=count)
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    kernels.backward(torch.randn_like(q), q, k, v, out, lse, None, args["bias"], args["mask"], args["kv_lens"], dq,
                     dk, dv, None, args["scale"], args["causal"], args["bottom_right"], count=count)
    return count, out


def test_bool_mask_skips_hidden_blocks_at_either_end(device):
    """A bool mask that hides whole key blocks at the ends of a block's range (padding, a causal mask given as a
    tensor) costs what the equivalent kv_lens / causal=True costs: the kernels skip the same blocks."""
    B, H, L, D = 2, 1, 150, 16
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    kv_lens = torch.tensor([70, 150], dtype=torch.int32, device=device)
    padding = torch.arange(L, device=device)[None, :] < kv_lens[:, None]  # True = attend
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    for mask, fast in ((padding.view(B, 1, 1, L), dict(kv_lens=kv_lens)), (causal.expand(B, H, L, L),
                                                                         dict(causal=True))):
        want, want_out = _visits(q, k, v, **fast)
        got, got_out = _visits(q, k, v, mask=mask)
        for name in want:
            assert torch.equal(got[name], want[name]), name
        torch.testing.assert_close(got_out, want_out)
    # Left padding: the leading hidden blocks are skipped too.
    left = (torch.arange(L, device=device) >= 100).expand(B, H, L, L)
    got, _ = _visits(q, k, v, mask=left)
    full, _ = _visits(q, k, v)
    assert got["fwd"].sum() < full["fwd"].sum() and got["dkdv"].sum() < full["dkdv"].sum()


# ------------------------------------------------------------------------------------------- determinism
def test_backward_is_deterministic(device):
    case = dict(causal=True, backend="triton")
    q, k, v = random_qkv(2, 4, 70, 90, 40, Hkv=2, device=device)
    bias = torch.randn(1, 4, 70, 90, device=device, dtype=q.dtype, requires_grad=True)
    do = torch.randn(2, 4, 70, 40, device=device, dtype=q.dtype)
    runs = []
    for _ in range(2):
        out = fastattn.attention(q, k, v, attn_bias=bias, **case)
        runs.append((out,) + torch.autograd.grad(out, (q, k, v, bias), do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- split-KV
# The heuristic splits only on GPUs (programs too few to fill them); here the splits are forced.
SPLIT_CASES = {
    "decode-gqa-kv_lens-br": dict(B=3, H=4, Hkv=2, Lq=1, Lk=300, D=64, causal=True, alignment="bottom_right",
                                  kv_lens=True, lse_grad=True),
    "chunk-mask": dict(B=2, Lq=17, Lk=150, D=40, bool_mask="full", causal=True),
    "features": dict(B=2, Lq=33, Lk=100, D=16, dtype=torch.float32, key_padding=True, bias="full",
                     bias_grad=True, alibi="heads", softcap=3.0, dropout=0.2),
    "window": dict(B=1, Lq=70, Lk=90, D=16, causal=True, alignment="bottom_right", window=(20, -1)),
    "varlen": dict(varlen=((1, 130), (5, 7), (0, 40), (3, 96)), H=4, Hkv=1, causal=True, alignment="bottom_right"),
    # fp32 scores of a few hundred: the splits' lse2 must reach the merge unrounded (out missed the rule, ×2.8)
    "fp32-large-logits": dict(B=2, Lq=3, Lk=200, D=32, dtype=torch.float32, logit_scale=8.0, seed=2),
}


@pytest.mark.parametrize("name,splits", [(name, 3) for name in SPLIT_CASES] + [("decode-gqa-kv_lens-br", 16),
                                                                                ("varlen", 16), ("fp32-large-logits", 4)])
def test_split_kv(name, splits):
    """The forward split into runs of key blocks (16: more splits than blocks, most empty) and merged by LSE."""
    from fastattn.triton import attention as kernels
    with kernels.forced_splits(splits):
        assert_case(AttentionCase(**{"seed": splits, **SPLIT_CASES[name]}))


@pytest.mark.skipif(not A.INTERPRET, reason="records the launches of Triton's interpreter")
def test_fp32_launches_compile_without_contraction(monkeypatch):
    """Every fp32 attention kernel launch (forward, split-KV merge, D pass, dq, dK/dV, the delta kernel, a broadcast
    bias's gradient) passes A.FP32_OPTIONS (no FMA contraction: the rounding the kernels were checked with, see
    tests/aot_compile.py); fp16 launches do not."""
    from triton.runtime.interpreter import InterpretedFunction
    launches = []
    run = InterpretedFunction.run

    def recording(self, *args, **kwargs):
        launches.append((self.fn.__name__, kwargs.get("enable_fp_fusion", True)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    for dtype in (torch.float32, torch.float16):
        launches.clear()
        q, k, v = random_qkv(2, 2, 20, 40, 16, dtype=dtype, generator=torch.Generator().manual_seed(0))
        bias = torch.randn(1, 2, 20, 40, dtype=dtype, requires_grad=True)
        with A.forced_splits(2):
            out = fastattn.attention(q, k, v, attn_bias=bias, backend="triton")
        out.sum().backward()
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        lse = torch.zeros(2, 2, 20, dtype=torch.float64 if dtype == torch.float32 else torch.float32)
        A.backward(out.detach(), q.detach(), k.detach(), v.detach(), out.detach(), lse, None, None, None, None, dq, dk,
                   dv, None, 0.25, False, False, delta_from_p=False)
        names = {name for name, _ in launches}
        assert {"_fwd_kernel", "_fwd_combine_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_dbias_kernel",
                "_bwd_delta_kernel"} <= names, names
        fused = {name for name, fusion in launches if fusion}
        assert fused == (set() if dtype == torch.float32 else names), (dtype, fused)


def test_split_kv_covers_every_key_block_once():
    """The splits of a query block visit its key blocks exactly once between them: per (head, query block), their
    visit counts add up to the unsplit forward's; empty rows stay 0 with LSE +inf."""
    from fastattn.ops.common import empty_like
    from fastattn.triton import attention as kernels

    B, H, Lq, Lk, D, n = 2, 2, 40, 230, 16, 3
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for L in (Lq, Lk, Lk))
    kv_lens = torch.tensor([0, 200], dtype=torch.int32, device=DEVICE)
    runs = {}
    for splits in (1, n):
        out, lse, count = empty_like(q), torch.empty(B, H, Lq, device=DEVICE), {}
        with kernels.forced_splits(splits):
            kernels.forward(q, k, v, None, None, kv_lens, out, lse, D ** -0.5, True, True, window=(60, -1),
                            count=count)
        m_blocks = -(-Lq // kernels.INTERPRET_BLOCK)
        runs[splits] = out, lse, count["fwd"][:splits * B * H * m_blocks].view(splits, B * H, m_blocks)
    (out1, lse1, visits1), (out_n, lse_n, visits_n) = runs[1], runs[n]
    assert torch.equal(visits_n.sum(0), visits1[0]) and visits1.sum() > 0
    assert (visits_n > 0).sum(0).max() > 1  # some query block was really split
    assert (out_n[0] == 0).all() and torch.isinf(lse_n[0]).all() and (lse_n[0] > 0).all()
    torch.testing.assert_close(out_n, out1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_n, lse1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("programs,key_blocks,sms", [(32, 128, 132), (1, 1000, 132), (8, 4, 132), (64, 64, 132),
                                                     (105, 500, 132), (200, 500, 132), (3, 3, 132)])
def test_num_splits(programs, key_blocks, sms):
    """Split only while the programs leave a fifth of the multiprocessors idle, never below two key blocks per
    split, and to waves at least 85% as full as the best split count's."""
    from fastattn.triton.attention import num_splits

    def fill(n):
        waves = programs * n / sms
        return waves / math.ceil(waves)
    n = num_splits(programs, key_blocks, sms)
    if programs >= 0.8 * sms or key_blocks < 4:
        assert n == 1
    else:
        assert 1 < n <= key_blocks // 2
        assert fill(n) >= 0.85 * max(fill(m) for m in range(1, key_blocks // 2 + 1) if m <= 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Lq", [1, 4])
def test_gpu_decode_splits(Lq, D, dtype, gpu_backend):
    """Decoding shapes (one query, or 4 draft tokens of speculative decoding, against a long cache), where the
    heuristics pack the GQA group and split the keys: the rule holds."""
    from fastattn.triton import attention as kernels
    q = torch.empty(1, 8, Lq, D, dtype=dtype, device="cuda")
    if gpu_backend == "triton":  # packed: 2 kv heads of 4·Lq rows
        assert kernels._pack_for(q, 4, Lq, D) and kernels._splits_for(q, 2, 4 * Lq, 5000, D) > 1
    else:
        from fastattn.cuda import attention as cuda_attention
        k = torch.empty(1, 2, 5000, D, dtype=dtype, device="cuda")
        assert cuda_attention.pack_gqa(q, k, None, 0.0, None, None, None)
        assert cuda_attention._splits(q, 1, 2, 4 * Lq, 5000, D) > 1
    assert_case(AttentionCase(B=1, H=8, Hkv=2, Lq=Lq, Lk=5000, D=D, dtype=dtype, causal=True,
                              alignment="bottom_right", kv_lens=True, seed=D + Lq), device="cuda",
                backend=gpu_backend)


# ------------------------------------------------------------------------------------------- packed GQA
# A group's query heads packed into one program's rows (forced here, with and without split-KV); odd groups and
# lengths make rows of one query block straddle heads and query positions.
PACK_CASES = {
    "decode-kv_lens-br": dict(B=3, H=4, Hkv=2, Lq=1, Lk=300, D=64, causal=True, alignment="bottom_right",
                              kv_lens=True, lse_grad=True),
    "mask-per-head": dict(B=2, H=6, Hkv=2, Lq=7, Lk=150, D=40, bool_mask="full", causal=True),
    "features": dict(B=2, H=4, Hkv=1, Lq=9, Lk=100, D=16, dtype=torch.float32, key_padding=True, bias="full",
                     bias_grad=True, alibi="heads", softcap=3.0, dropout=0.2),
    "window-group3": dict(B=1, H=3, Hkv=1, Lq=20, Lk=90, D=16, causal=True, alignment="bottom_right",
                          window=(20, -1)),
    "varlen": dict(varlen=((1, 130), (5, 7), (0, 40), (3, 96)), H=4, Hkv=1, causal=True, alignment="bottom_right"),
    # fp32 scores of a few hundred: the splits' lse2 must reach the merge unrounded (out missed the rule, ×2.8)
    "fp32-large-logits": dict(B=2, Lq=3, Lk=200, D=32, dtype=torch.float32, logit_scale=8.0, seed=2),
}


@pytest.mark.parametrize("name,splits", [(name, 1) for name in PACK_CASES] + [("decode-kv_lens-br", 3),
                                                                               ("varlen", 3)])
def test_pack_gqa(name, splits):
    """The forward with a GQA group's query heads packed into one program's rows (and split 3 ways): the rule holds
    for every output and gradient."""
    from fastattn.triton import attention as kernels
    with kernels.forced_pack_gqa(True), kernels.forced_splits(splits):
        assert_case(AttentionCase(**{"seed": splits, **PACK_CASES[name]}))


def test_pack_gqa_reads_each_kv_block_once_per_group():
    """Decoding with packed GQA: one program per kv head reads each of its key blocks once for the whole group
    (a group of 4: a quarter of the unpacked forward's key-block loads), with the same output."""
    from fastattn.ops.common import empty_like
    from fastattn.triton import attention as kernels

    B, H, Hkv, Lk, D = 2, 8, 2, 200, 16
    q = torch.randn(B, H, 1, D, device=DEVICE)
    k, v = (torch.randn(B, Hkv, Lk, D, device=DEVICE) for _ in range(2))
    kv_lens = torch.tensor([37, 200], dtype=torch.int32, device=DEVICE)
    runs = {}
    for pack in (False, True):
        out, lse, count = empty_like(q), torch.empty(B, H, 1, device=DEVICE), {}
        with kernels.forced_pack_gqa(pack):
            kernels.forward(q, k, v, None, None, kv_lens, out, lse, D ** -0.5, True, True, count=count)
        runs[pack] = out, lse, count["fwd"].sum().item()
    blocks = [-(-n // kernels.INTERPRET_BLOCK) for n in kv_lens.tolist()]
    assert runs[False][2] == H * sum(blocks) and runs[True][2] == Hkv * sum(blocks)
    for a, b in zip(runs[False][:2], runs[True][:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group,Lq,block_m", [(4, 1, 128), (8, 4, 128), (2, 1000, 128), (4, 100, 128),
                                              (1, 1, 128), (6, 17, 32), (2, 17, 32), (3, 1, 16)])
def test_pack_gqa_rule(group, Lq, block_m):
    """Pack when Lq rows per head fill under 90% of the fraction of their tiles that Lq · group rows fill."""
    from fastattn.triton.attention import pack_gqa

    def used(rows):
        return rows / (math.ceil(rows / block_m) * block_m)
    assert pack_gqa(group, Lq, block_m) == (group > 1 and used(Lq) < 0.9 * used(Lq * group))
    if Lq == 1 and group > 1:
        assert pack_gqa(group, Lq, block_m)  # decoding always packs


# ------------------------------------------------------------------------------------------- SDPA drop-in
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float", "gqa", "3d", "2d-causal", "5d-mask",
                                  "6d-causal"])
def test_sdpa_matches_torch(kind, device, monkeypatch):
    """fastattn.scaled_dot_product_attention has torch's semantics: equal to torch's in float64 (reference path),
    and the Triton kernels on the same problem in float32 pass the §5 rule against it."""
    g = torch.Generator().manual_seed(1)
    B, H, L, S, D = 2, 4, 33, 47, 16
    Hkv = 2 if kind == "gqa" else H
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    kw = {"scale": 0.3}
    if kind == "causal":
        kw["is_causal"] = True
    if kind == "bool":
        kw["attn_mask"] = torch.rand(B, 1, L, S, generator=g) > 0.3
        kw["attn_mask"][..., 0] = True  # torch gives NaN for empty rows; fastattn gives 0
    if kind == "float":
        kw["attn_mask"] = torch.randn(H, L, S, generator=g, dtype=torch.float64)
    if kind == "gqa":
        kw["enable_gqa"] = True
    if kind == "3d":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    if kind == "2d-causal":
        q, k, v = q[0, 0], k[0, 0], v[0, 0]
        kw["is_causal"] = True
    if kind == "5d-mask":  # (N, X, H, L, D), as torch takes; a mask over N and H, broadcast over X
        q, k, v = (t.reshape(2, 2, 2, *t.shape[-2:]) for t in (q, k, v))
        kw["attn_mask"] = torch.randn(2, 1, 2, L, S, generator=g, dtype=torch.float64)
    if kind == "6d-causal":
        q, k, v = (t.reshape(1, 2, 2, 2, *t.shape[-2:]) for t in (q, k, v))
        kw["is_causal"] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v, **kw)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, **kw), want, rtol=1e-12, atol=1e-12)

    def cast(t):
        return t.to(device, torch.float32 if t.is_floating_point() else t.dtype) if torch.is_tensor(t) else t

    low = sdpa(*(cast(t).cpu() for t in (q, k, v)), **{n: cast(t).cpu() if torch.is_tensor(t) else t
                                                        for n, t in kw.items()})
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")  # the drop-in has no backend argument: steer "auto"
    got = fastattn.scaled_dot_product_attention(*(cast(t) for t in (q, k, v)), **{n: cast(t) for n, t in kw.items()})
    check_close(got.cpu(), want, low)


# ------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph(device):
    """Inductor traces the custom ops (fakes + autograd) in one graph; results equal eager bitwise."""
    def f(q, k, v, bias, kv_lens, sinks):
        return fastattn.attention(q, k, v, causal=True, attn_bias=bias, kv_lens=kv_lens, sinks=sinks,
                                  backend="triton") * 2

    q, k, v = random_qkv(2, 2, 40, 40, 32, device=device)
    bias = torch.randn(1, 2, 40, 40, device=device, dtype=q.dtype, requires_grad=True)
    kv_lens = torch.tensor([40, 17], dtype=torch.int32, device=device)
    sinks = torch.randn(2, device=device, requires_grad=True)
    cf = torch.compile(f, fullgraph=True)
    out = cf(q, k, v, bias, kv_lens, sinks)
    ref = f(q, k, v, bias, kv_lens, sinks)
    assert torch.equal(out, ref)
    g1 = torch.autograd.grad(out.sum(), (q, k, v, bias, sinks))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v, bias, sinks))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_dispatch_traces_for_every_kernel_backend(kernel_backend):
    """torch.compile(fullgraph=True) traces the ops' Python for each kernel backend (the CUDA backend's
    availability check imports its extension, which Dynamo cannot trace: it is a constant there)."""
    q, k, v = random_qkv(1, 2, 8, 8, 16, device=DEVICE, requires_grad=False)
    x = torch.randn(3, 16, device=DEVICE, dtype=q.dtype)

    def f(q, k, v, x):
        return (fastattn.attention(q, k, v, backend=kernel_backend), fastattn.softmax(x, backend=kernel_backend),
                fastattn.layer_norm(x, 16, backend=kernel_backend))

    for got, want in zip(torch.compile(f, fullgraph=True, backend="eager")(q, k, v, x), f(q, k, v, x)):
        assert torch.equal(got, want)


def test_custom_op_registration():
    """The fakes agree with the real ops (torch.library's own consistency check)."""
    q, k, v = random_qkv(1, 2, 20, 24, 16, device=DEVICE)
    bias = torch.randn(1, 2, 20, 24, device=DEVICE, dtype=q.dtype, requires_grad=True)
    slopes = torch.rand(1, 2, device=DEVICE)
    seed = torch.tensor(1 << 40)
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    for window, alibi, cap, drop, sk in (((-1, -1), None, 0.0, 0.0, None), ((5, 0), slopes, 3.0, 0.2, sinks)):
        args = (q, k, v, bias, None, None, None, None, 0, 0, 0.25, True, False, *window, alibi, cap, drop, seed, sk,
                "triton", True)
        torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # packed varlen: [total, H, D] with cumulative lengths, lse [H, total]
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = (t[0].transpose(0, 1).contiguous().detach().requires_grad_() for t in (q, k[:, :, :20], v[:, :, :20]))
    args = (qp, kp, vp, None, None, None, cu, cu, 13, 13, 0.25, True, True, -1, -1, None, 0.0, 0.1, seed, sinks,
            "triton", True)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # the backward of a transposed bias: its gradient comes back contiguous, as the fake says (inductor checks)
    bt = torch.randn(1, 2, 24, 20, device=DEVICE).transpose(2, 3)
    q, k, v = (t.detach() for t in (q, k, v))
    fwd = (q, k, v, bt, None, None, None, None, 0, 0, 0.25, False, False, -1, -1, None, 0.0, 0.0, None, None,
           "triton", True)
    out, lse, lo = torch.ops.fastattn.attention_fwd(*fwd)
    args = (torch.randn_like(out), q, k, v, out, lo, lse, None, *fwd[3:-2], True, "triton")
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, args, test_utils=("test_schema", "test_faketensor"))
    # the raw ops on q / k / v whose last dim is strided (the public function passes them with stride 1): made
    # readable inside, forward and backward, fakes agreeing
    qs, ks, vs = (torch.randn(1, 2, 20, 16, 2, device=DEVICE)[..., 0].requires_grad_() for _ in range(3))
    raw = (qs, ks, vs, None, None, None, None, None, 0, 0, 0.25, True, False, -1, -1, None, 0.0, 0.0, None, None,
           "triton", False)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, raw,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = torch.ops.fastattn.attention_fwd(*raw)[0]
    ref = fastattn.reference.attention(qs, ks, vs, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    gout = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, (qs, ks, vs), gout), torch.autograd.grad(ref, (qs, ks, vs), gout)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [(1, 1), (17, 17), (113, 113), (1023, 1023), (128, 2048), (2048, 128), (1023, 17)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("Lq,Lk", GPU_SHAPES)
@pytest.mark.parametrize("D", [16, 40, 64, 80, 111, 128, 256])
def test_gpu_matrix(Lq, Lk, D, dtype, gpu_backend):
    conftest.skip_cuda_fp32_attention(gpu_backend, dtype)
    for causal, align in ((False, "top_left"), (True, "top_left"), (True, "bottom_right")):
        assert_case(AttentionCase(B=2, H=3, Hkv=1, Lq=Lq, Lk=Lk, D=D, dtype=dtype, causal=causal, alignment=align,
                                  kv_lens=True, seed=D + Lq), device="cuda", backend=gpu_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature", list(MASKS) + ["bias", "lse"])
def test_gpu_features(feature, dtype, gpu_backend):
    extra = MASKS.get(feature, {})
    if feature == "bias":
        extra = dict(bias="heads", bias_grad=True, causal=True)
    if feature == "lse":
        extra = dict(lse_grad=True, kv_lens=True)
    for D, (Lq, Lk) in itertools.product((64, 128), ((1000, 1000), (300, 1500))):
        assert_case(AttentionCase(B=2, H=4, Hkv=2, Lq=Lq, Lk=Lk, D=D, dtype=dtype, seed=D, **extra), device="cuda",
                    backend=gpu_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_gpu_fp32_every_feature(seed):
    """fp32 with a soft cap, ALiBi, a full bias and its gradient, key padding and dropout at once: the case whose
    CPU misses the fp32 backward's normalised D and accurate exp2 removed (README, Numerics)."""
    assert_case(AttentionCase(B=2, H=4, Hkv=1, Lq=90, Lk=300, D=64, dtype=torch.float32, key_padding=True,
                              bias="full", bias_grad=True, alibi="heads", softcap=3.0, dropout=0.2, seed=seed),
                device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_autotuned(D, dtype, monkeypatch):
    """The autotuned launch path (every config benchmarked, the fastest kept) meets the rule too (fp32: the D pass
    adds to its output, so its autotuning must restore it between configs)."""
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "1")
    assert_case(AttentionCase(B=2, H=4, Hkv=2, Lq=700, Lk=900, D=D, dtype=dtype, causal=True, kv_lens=True,
                              seed=D), device="cuda")


FORCED = {  # (fwd, dkdv, dq) tiles (BLOCK_M, BLOCK_N): both orientations of non-square tiles
    "tall-dkdv": ((16, 64), (64, 16), (16, 16)),
    "wide-dkdv": ((32, 16), (16, 64), (64, 16)),  # the shape of the GPU's dK/dV tiles (keys > queries)
}


@pytest.mark.parametrize("tiles", list(FORCED))
def test_forced_configs(tiles):
    """Kernels launched with forced tile configs (other than the interpreter's default) still meet the rule, with
    every per-element feature of the tiles on: masks, bias and its gradient, dropout, window, ALiBi, soft cap."""
    import triton

    from fastattn.triton import attention as kernels
    cfg = {name: triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for name, (m, n) in zip(("fwd", "dkdv", "dq"),
                                                                                      FORCED[tiles])}
    cases = [AttentionCase(B=1, H=2, Hkv=1, Lq=37, Lk=70, D=32, dtype=torch.float32, causal=True, kv_lens=True,
                           seed=3),
             AttentionCase(B=2, H=4, Hkv=2, Lq=45, Lk=70, D=24, dtype=torch.float32, bias="full", bias_grad=True,
                           dropout=0.2, alibi="heads", softcap=4.0, seed=4),
             AttentionCase(B=2, H=2, Lq=70, Lk=45, D=16, dtype=torch.float16, bool_mask="full", window=(9, 3),
                           causal=True, alignment="bottom_right", seed=5)]
    with kernels.forced_configs(**cfg):
        assert kernels._FORCED
        for case in cases:
            assert_case(case)
    assert not kernels._FORCED


def test_untuned_launch_falls_back_when_a_tile_does_not_fit(monkeypatch):
    """Without autotuning, a config whose shared memory the GPU lacks (OutOfResources at launch, e.g. a bool mask
    and a bias at d128 on an A100) falls back to the next pruned config, and is not tried again for that kernel
    variant; the last config's error propagates."""
    import triton

    from fastattn.triton import attention as kernels

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=8, num_stages=2) for m in (128, 64, 32)]
    launched = []

    class Fake:
        arg_names = ["Q"]

        def __init__(self, too_big):
            self.configs, self.too_big = configs, too_big
            self.fn = self

        def early_config_prune(self, configs, named_args, **kwargs):
            return configs

        def __getitem__(self, grid):
            def run(*args, BLOCK_M, **kwargs):
                launched.append(BLOCK_M)
                if BLOCK_M in self.too_big:
                    raise triton.runtime.errors.OutOfResources(BLOCK_M * 1024, 163 * 1024, "shared memory")
                return BLOCK_M
            return run

    monkeypatch.setattr(kernels, "autotune_enabled", lambda: False)
    q = torch.empty(1)
    fake = Fake({128})
    assert kernels._launch(fake, (1,), q, HAS_MASK=True) == 64 and launched == [128, 64]
    assert kernels._launch(fake, (1,), q, HAS_MASK=True) == 64 and launched == [128, 64, 64]
    assert kernels._launch(fake, (1,), q, HAS_MASK=False) == 64 and launched[3:] == [128, 64]  # another variant
    with pytest.raises(triton.runtime.errors.OutOfResources):
        kernels._launch(Fake({128, 64, 32}), (1,), q, HAS_BIAS=True)


def _every_config():
    from fastattn.triton import attention as kernels
    probe = torch.empty(0, dtype=torch.float16)
    for name in ("fwd", "dkdv", "dq"):
        for D in (64, 128):
            for c in kernels.configs_for(name, probe, D):
                cfg = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"
                yield pytest.param(name, D, c, id=f"{name}-d{D}-{cfg}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,D,config", list(_every_config()))
def test_gpu_every_config(kernel, D, config):
    """Each autotune config of each kernel, forced, meets the rule (autotuning may pick any of them)."""
    from fastattn.triton import attention as kernels
    with kernels.forced_configs(**{kernel: config}):
        for causal in (False, True):
            assert_case(AttentionCase(B=2, H=3, Hkv=1, Lq=113, Lk=300, D=D, dtype=torch.float16, causal=causal,
                                      kv_lens=True, seed=D), device="cuda")


@pytest.mark.gpu
def test_gpu_more_batch_heads_than_a_grid_axis():
    """B·H = 70400 (past CUDA's 65535 on a grid's y axis): heads on the grid's second axis, batch on its third."""
    assert_case(AttentionCase(B=1100, H=64, Hkv=16, Lq=3, Lk=5, D=16, dtype=torch.float16, causal=True,
                              bias="batch", bias_grad=True), device="cuda")


@pytest.mark.gpu
def test_gpu_new_lengths_do_not_recompile():
    """Lengths in one power-of-two bucket share the tuned config and the compiled kernels."""
    from fastattn.triton import attention as kernels

    def compiled():
        return sum(len(c[0]) for c in kernels._fwd_kernel.fn.device_caches.values())

    q, k, v = random_qkv(1, 2, 600, 600, 64, device="cuda", requires_grad=False)
    fastattn.attention(q, k, v, causal=True)
    n = compiled()
    for L in (520, 700, 1000):
        q, k, v = random_qkv(1, 2, L, L, 64, device="cuda", requires_grad=False)
        fastattn.attention(q, k, v, causal=True)
    assert compiled() == n


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 64])
def test_gpu_unaligned_strided_inputs(D, gpu_backend):
    """q, k, v whose rows are neither 16-byte aligned nor of a 16-byte multiple stride."""
    q, k, v = (torch.randn(2, 3, 100, D + 2, device="cuda", dtype=torch.float16)[..., 1:D + 1] for _ in range(3))
    out = fastattn.attention(q, k, v, causal=True, backend=gpu_backend)
    ref = fastattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend=gpu_backend)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("extra", [{}, dict(dropout=0.3), dict(causal=True, kv_lens=True, lse_grad=True)],
                         ids=["plain", "dropout", "causal+kv_lens+lse_grad"])
def test_attention_sink_gradients(kernel_backend, extra):
    """Every query puts p ≈ 0.99 on key 0 (an attention sink, as trained models' heads often do). The fp16
    backward's D_i = do_i·o_i takes the output whole, with what rounding it to fp16 dropped (the forward's
    out_lo): from the rounded output alone, ds_ij = p_ij (dp_ij − D_i) passed D's ~2⁻¹¹ error on whole where
    the reference's softmax backward shrinks its own rounding by 1 − p_ij, and dk missed the rule (×4.2 with
    causal + kv_lens; ×3.0 and ×1.9 in the others, against 0.1–1.4 now)."""
    for seed in range(3):
        assert_case(AttentionCase(B=1, H=2, Lq=64, Lk=64, D=64, sink=9.0, seed=seed, **extra),
                    backend=kernel_backend)
