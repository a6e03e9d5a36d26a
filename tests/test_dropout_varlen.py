"""Attention dropout (Philox inside the kernels) and packed variable-length batches (cu_seqlens), against the
reference under DESIGN.md §5: the kernel's keep-mask is replayed on the reference, packed batches are compared
sequence by sequence."""
import pytest
import torch

import conftest
import fastattn
from conftest import DEVICE
from fastattn import reference
from fastattn.testing import AttentionCase, random_qkv, run_attention_case

DTYPES = [torch.float16, torch.float32]


def assert_case(case, device=DEVICE, backend="triton"):
    conftest.assert_case(run_attention_case, case, device, backend)


# --------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [
    dict(),
    dict(causal=True, Lq=40, Lk=23, alignment="bottom_right", kv_lens=True),
    dict(Hkv=1, H=4, bias="full", bias_grad=True, lse_grad=True),
    dict(key_padding=True, window=(5, 2), softcap=3.0, D=40),
    dict(Hkv=1, H=4, bias="heads", bias_grad=True, causal=True),
    dict(dropout=0.9, window=(0, 0), Lq=40, Lk=40),
], ids=["plain", "causal-br-kvlens", "gqa-bias-lse", "padding-window-softcap", "gqa-broadcast-bias",
        "p0.9-one-key-rows"])
def test_dropout_matches_reference_with_same_mask(extra, dtype):
    """p0.9-one-key-rows: 1 − fl32(p) is 2.4e-7 off 1 − p for p = 0.9, which fp32 outputs showed (×3.75 the
    rule); the kernels take 1 − p rounded once (dropout_keep_scale). Rows of one key: exact zero gradients."""
    kw = dict(B=2, H=2, Lq=33, Lk=47, D=16, dtype=dtype, dropout=0.25, seed=11)
    assert_case(AttentionCase(**{**kw, **extra}))


def test_dropout_keep_fraction_and_seeds():
    """|kept − (1 − p)| < 0.01 over 2·10⁵ weights; a new draw gives a new mask; torch.manual_seed replays it."""
    q, k, v = random_qkv(1, 4, 224, 224, 16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    p = 0.3

    def run(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        return fastattn.attention(q, k, v, dropout_p=p, return_dropout_mask=True, backend="triton")

    out1, keep1 = run(seed=5)
    out2, keep2 = run()
    out3, keep3 = run(seed=5)
    assert abs(keep1.float().mean().item() - (1 - p)) < 0.01
    assert abs(keep2.float().mean().item() - (1 - p)) < 0.01
    assert (keep1 != keep2).float().mean().item() > 0.3  # independent masks differ in 2p(1−p) = 42% of places
    assert torch.equal(keep1, keep3) and torch.equal(out1, out3)
    assert not torch.equal(out1, out2)
    # Neighbouring (row, column) counters are not correlated: kept fractions agree across rows and heads.
    assert keep1.float().mean(dim=(0, 2, 3)).sub(1 - p).abs().max().item() < 0.02


def test_dropout_backward_reuses_forward_mask():
    """With do = 1, dv_j = Σ_i p_ij·keep_ij / (1 − p): the backward applies exactly the forward's mask."""
    q, k, v = random_qkv(1, 2, 20, 30, 16, dtype=torch.float32, device=DEVICE)
    torch.manual_seed(3)
    out, keep = fastattn.attention(q, k, v, dropout_p=0.5, return_dropout_mask=True, backend="triton")
    dv, = torch.autograd.grad(out.sum(), v)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4, dim=-1)
    want = (probs * keep / 0.5).sum(dim=2)[..., None].expand_as(dv)
    torch.testing.assert_close(dv.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_with_one_key_have_exactly_zero_gradients(dropout, dtype, kernel_backend):
    """A query row that sees one key has p = 1 on it, so ds = p (dp − D) = 0: its dq and dbias, and the dk of a
    key only such rows see, are exactly 0, as the reference's autograd gives them. With dropout too: the fp32
    backward forms dp through the factor the forward scaled that row's output by, so dp − D cancels exactly
    (dividing do·v by 1 − p instead left gradients of rounding size, up to 6× the rule's bound); fp16/bf16, whose
    D also holds what rounding the output dropped (and dp = r·(do·v) in fp32), give ds = 0 where p = 1 exactly.
    p = 0.9: the interpreter once formed 1 − p in fp64 where r·v took it in fp32 (the kernels now take it from
    the host)."""
    conftest.skip_cuda_fp32_attention(kernel_backend, dtype)
    B, H, Lq, Lk, D = 2, 2, 24, 40, 32
    q, k, v = random_qkv(B, H, Lq, Lk, D, dtype=dtype, device=DEVICE)
    bias = torch.randn(B, H, Lq, Lk, device=DEVICE).to(dtype).requires_grad_()
    kv_lens = torch.tensor([1, 17], dtype=torch.int32, device=DEVICE)  # batch 0: every row sees key 0 alone
    torch.manual_seed(7)
    out, keep = fastattn.attention(q, k, v, causal=True, kv_lens=kv_lens, attn_bias=bias, dropout_p=dropout,
                                   return_dropout_mask=True, backend=kernel_backend)
    out.backward(torch.randn_like(out))
    if dropout:
        assert keep[0, :, :, 0].any()  # some single-key rows keep their key (dropped ones cancel trivially)
    for name, g in (("dq", q.grad), ("dbias", bias.grad)):  # batch 0, and batch 1's row 0 (causal: key 0 alone)
        assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[1, :, 0]) == 0, name
        assert torch.count_nonzero(g[1, :, 1:]) > 0, name  # rows with several keys: not vacuous
    assert torch.count_nonzero(k.grad[0]) == 0 and torch.count_nonzero(k.grad[1, :, 1:17]) > 0


def test_dropout_eval_and_zero_p_use_no_mask():
    q, k, v = random_qkv(1, 2, 9, 9, 16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    a = fastattn.attention(q, k, v, backend="triton")
    b, keep = fastattn.attention(q, k, v, dropout_p=0.0, return_dropout_mask=True, backend="triton")
    assert torch.equal(a, b) and keep.all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_of_one_drops_every_weight(backend):
    """dropout_p = 1 (torch's dropout and SDPA accept it): out = 0, q/k/v gradients through out 0, the keep-mask
    all False, and the LSE that of the scores (its gradient flows as without dropout)."""
    q, k, v = random_qkv(2, 2, 9, 12, 16, dtype=torch.float32, device=DEVICE)
    out, lse, keep = fastattn.attention(q, k, v, dropout_p=1.0, causal=True, return_lse=True,
                                        return_dropout_mask=True, backend=backend)
    ref_out, ref_lse = fastattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.count_nonzero(out) == 0 and not keep.any() and torch.equal(lse, ref_lse)
    grads = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    (g_lse,) = torch.autograd.grad(lse.sum(), q)
    (g_ref,) = torch.autograd.grad(ref_lse.sum(), q)
    assert torch.equal(g_lse, g_ref) and torch.count_nonzero(g_lse) > 0


def test_dropout_mask_argument_is_for_the_reference_only():
    q, k, v = random_qkv(1, 1, 4, 4, 16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_mask"):
        fastattn.attention(q, k, v, dropout_p=0.1, dropout_mask=keep, backend="triton")
    with pytest.raises(ValueError, match="dropout_mask must be a bool tensor of shape"):
        fastattn.attention(q, k, v, dropout_p=0.1, dropout_mask=keep[..., :3], backend="torch")
    with pytest.raises(ValueError, match="needs dropout_p > 0"):  # it would be ignored, yet handed back
        fastattn.attention(q, k, v, dropout_p=0.0, dropout_mask=keep, return_dropout_mask=True, backend="torch")


def test_numpy_scalars_are_accepted_as_torch_does():
    """dropout_p, scale, softcap and window sides as numpy scalars (torch's SDPA takes them for its arguments):
    the same result as Python numbers."""
    import numpy as np
    q, k, v = random_qkv(1, 2, 5, 6, 16, dtype=torch.float32, device=DEVICE, requires_grad=False)
    keep = torch.rand(1, 2, 5, 6, device=DEVICE) > 0.25
    a = fastattn.attention(q, k, v, dropout_p=np.float32(0.25), scale=np.float32(0.5), dropout_mask=keep,
                           backend="torch")
    b = fastattn.attention(q, k, v, dropout_p=float(np.float32(0.25)), scale=float(np.float32(0.5)),
                           dropout_mask=keep, backend="torch")
    assert torch.equal(a, b)
    assert fastattn.scaled_dot_product_attention(q, k, v, dropout_p=np.float64(0.0)).shape == q.shape
    c = fastattn.attention(q, k, v, window_size=(np.int64(2), np.int32(-1)), softcap=np.float32(3.0), backend="torch")
    assert torch.equal(c, fastattn.attention(q, k, v, window_size=(2, -1), softcap=3.0, backend="torch"))


# --------------------------------------------------------------------------------------------- packed varlen
LENS = ((17, 17), (1, 1), (0, 0), (40, 40), (5, 5))
CROSS = ((17, 30), (9, 0), (33, 3), (1, 12))


VARLEN_CASES = {  # also run by tests/test_cuda_emulated.py
    "self": dict(varlen=LENS),
    "causal": dict(varlen=LENS, causal=True),
    "cross-causal-br-lse": dict(varlen=CROSS, causal=True, alignment="bottom_right", lse_grad=True),
    "gqa-window-alibi": dict(varlen=CROSS, H=4, Hkv=2, window=(4, 1), alibi="batch"),
    "softcap-local": dict(varlen=LENS, softcap=2.0, logit_scale=2.0, causal=True, window=(3, -1)),
    "dropout": dict(varlen=CROSS, dropout=0.2, causal=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", list(VARLEN_CASES.values()), ids=list(VARLEN_CASES))
def test_varlen_matches_reference(extra, dtype):
    assert_case(AttentionCase(D=16, dtype=dtype, seed=7, **extra))


def test_varlen_strided_cu_seqlens(kernel_backend):
    """cu_seqlens given as a strided view (every other entry of a longer tensor) read as the values it holds."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(14, 2, 16, generator=g).to(DEVICE, torch.float16) for _ in range(3))
    cu = torch.tensor([0, 99, 5, 99, 5, 99, 14, 99], dtype=torch.int32, device=DEVICE)[::2]
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=9, max_seqlen_k=9, causal=True)
    dense = dict(kw, cu_seqlens_q=cu.contiguous(), cu_seqlens_k=cu.contiguous())
    assert torch.equal(fastattn.attention(q, k, v, backend=kernel_backend, **kw),
                       fastattn.attention(q, k, v, backend=kernel_backend, **dense))


def test_varlen_equals_padded_batch():
    """unpad -> packed attention -> pad gives the padded batch's result with key_padding_mask on every valid row."""
    g = torch.Generator().manual_seed(2)
    B, L, H, D = 3, 21, 2, 16
    x = torch.randn(B, L, 3, H, D, generator=g).to(DEVICE)
    lens = torch.tensor([21, 4, 13])
    pad_mask = (torch.arange(L)[None, :] >= lens[:, None]).to(DEVICE)  # True = padding
    packed, idx, cu, max_len = fastattn.unpad(x, pad_mask)
    assert cu.tolist() == [0, 21, 25, 38] and max_len == 21 and packed.shape == (38, 3, H, D)
    q, k, v = packed.unbind(1)
    out = fastattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                             causal=True, backend="triton")
    out_pad = fastattn.pad(out, idx, B, L)
    qp, kp, vp = (t.transpose(1, 2) for t in x.unbind(2))
    want = reference.attention(qp.double(), kp.double(), vp.double(), causal=True,
                               attn_mask=~pad_mask[:, None, None, :]).transpose(1, 2)
    valid = ~pad_mask
    torch.testing.assert_close(out_pad[valid].double(), want[valid], rtol=1e-5, atol=1e-6)
    assert (out_pad[~valid] == 0).all()


def test_unpad_pad_roundtrip_and_gradient():
    x = torch.randn(2, 5, 3, requires_grad=True)
    mask = torch.tensor([[False, True, False, False, True], [True, True, True, True, True]])  # holes, empty row
    packed, idx, cu, m = fastattn.unpad(x, mask)
    assert cu.tolist() == [0, 3, 3] and m == 3 and torch.equal(packed, x[0, [0, 2, 3]])
    back = fastattn.pad(packed, idx, 2, 5)
    assert torch.equal(back, x.masked_fill(mask[..., None], 0.0))
    back.sum().backward()
    assert torch.equal(x.grad, (~mask)[..., None].float().expand_as(x))
    for bad, err, words in ((idx.int(), TypeError, "int64"), (idx + 8, ValueError, r"lie in \[0, batch·seqlen"),
                            (idx * 0, ValueError, "distinct"), (idx.tolist(), TypeError, "int64")):
        with pytest.raises(err, match=words):
            fastattn.pad(packed, bad, 2, 5)


@pytest.mark.parametrize("kw,err,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int64)), TypeError, "cu_seqlens_q must be an int32"),
    (dict(max_seqlen_q=2), ValueError, "max_seqlen_q = 2 but a sequence has 3"),
    (dict(max_seqlen_k=3.0), TypeError, "max_seqlen_k must be a Python int"),
    (dict(cu_seqlens_k=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "cu_seqlens_k must rise from 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 1, 3], dtype=torch.int32)), ValueError, "B \\+ 1 entries"),
    (dict(kv_lens=torch.tensor([3], dtype=torch.int32)), ValueError, "kv_lens cannot be combined"),
    (dict(cu_seqlens_k=None), ValueError, "needs both cu_seqlens_q and cu_seqlens_k"),
])
def test_varlen_bad_arguments_are_named(kw, err, match):
    q = torch.randn(3, 2, 16)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3, backend="torch")
    with pytest.raises(err, match=match):
        fastattn.attention(q, q, q, **{**args, **kw})


def test_one_cu_seqlens_names_the_other_before_the_layout():
    """Only cu_seqlens_q with padded (B, H, L, D) tensors: the missing cu_seqlens_k is the error, not q's dims."""
    q = torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="needs both cu_seqlens_q and cu_seqlens_k"):
        fastattn.attention(q, q, q, cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32))


def test_max_seqlen_without_cu_seqlens_is_refused():
    q = torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="max_seqlen_q / max_seqlen_k belong to packed"):
        fastattn.attention(q, q, q, max_seqlen_q=3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_and_dropout_under_torch_compile(backend):
    """max_seqlen as Python ints and the seed drawn on the CPU: the compiled graph has no data-dependent break."""
    case = AttentionCase(varlen=((5, 5), (9, 9)), D=16, dtype=torch.float32)
    from fastattn.testing import _case_inputs
    (q, k, v), kw, _, _ = _case_inputs(case, DEVICE)
    kw.pop("causal_alignment")

    def f(q, k, v):
        return fastattn.attention(q, k, v, dropout_p=0.1, backend=backend, **kw)

    torch.manual_seed(0)
    want = f(q, k, v)
    torch.manual_seed(0)
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert got.shape == want.shape and torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    dict(B=2, H=8, Hkv=2, Lq=1023, Lk=1023, D=128, causal=True, dropout=0.1),
    dict(B=2, H=4, Lq=257, Lk=700, D=64, dropout=0.3, bias="heads", bias_grad=True),
    dict(H=8, Hkv=4, D=128, varlen=((1000, 1000), (1, 1), (513, 513), (0, 0), (77, 77)), causal=True),
    dict(H=4, D=64, varlen=((300, 900), (64, 17), (1, 1000)), causal=True, alignment="bottom_right", dropout=0.2),
    dict(H=4, Hkv=1, D=256, varlen=((129, 300), (700, 700), (5, 0)), causal=True, alignment="bottom_right",
         dropout=0.1, lse_grad=True),
    dict(H=2, D=40, varlen=((33, 47), (200, 64), (17, 1)), dropout=0.25),  # head dim padded by the CUDA side
    dict(H=4, D=256, varlen=((129, 129), (700, 700)), window=(64, 0), alibi="heads"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", GPU_CASES, ids=["dropout-gqa-causal", "dropout-bias", "varlen-gqa-causal",
                                                  "varlen-cross-br-dropout", "varlen-mqa-d256-dropout-lse",
                                                  "varlen-d40-dropout", "varlen-window-alibi"])
def test_gpu_dropout_varlen(extra, dtype, gpu_backend):
    """Every case on both backends: for "cuda" the reference replays the mask of return_dropout_mask (drawn by
    the Triton kernel), so a pass also shows that the CUDA kernels drew the same Philox mask."""
    conftest.skip_cuda_fp32_attention(gpu_backend, dtype)
    assert_case(AttentionCase(dtype=dtype, seed=5, **extra), device="cuda", backend=gpu_backend)
