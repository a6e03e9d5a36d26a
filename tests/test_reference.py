"""The oracle itself: fastattn.reference against torch's SDPA (float64) and against the mask definitions."""
import pytest
import torch

import fastattn
from fastattn import reference

sdpa = torch.nn.functional.scaled_dot_product_attention
g = torch.Generator().manual_seed(3)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_plain_and_causal_top_left_match_sdpa():
    q, k, v = rand(2, 3, 9, 8), rand(2, 3, 9, 8), rand(2, 3, 9, 8)
    torch.testing.assert_close(reference.attention(q, k, v), sdpa(q, k, v))
    torch.testing.assert_close(reference.attention(q, k, v, causal=True), sdpa(q, k, v, is_causal=True))


@pytest.mark.parametrize("Lq,Lk", [(5, 9), (9, 5), (7, 7)])
def test_bottom_right_is_lower_right_tril(Lq, Lk):
    q, k, v = rand(1, 2, Lq, 8), rand(1, 2, Lk, 8), rand(1, 2, Lk, 8)
    tril = torch.ones(Lq, Lk, dtype=torch.bool).tril(diagonal=Lk - Lq)
    got = reference.attention(q, k, v, causal=True, bottom_right=True)
    want = sdpa(q, k, v, attn_mask=tril).nan_to_num(0.0)  # torch: NaN for the rows with no key
    torch.testing.assert_close(got, want)
    if Lq > Lk:
        assert (got[:, :, : Lq - Lk] == 0).all()


def test_kv_lens_is_slicing_the_keys():
    """kv_lens[b] = n means attending to k[b, :, :n]; bottom-right aligns to n (KV-cache decoding)."""
    q, k, v = rand(3, 2, 4, 8), rand(3, 2, 10, 8), rand(3, 2, 10, 8)
    lens = torch.tensor([10, 6, 4], dtype=torch.int32)
    for causal in (False, True):
        got = reference.attention(q, k, v, kv_lens=lens, causal=causal, bottom_right=True)
        for b, n in enumerate(lens.tolist()):
            tril = torch.ones(4, n, dtype=torch.bool).tril(diagonal=n - 4) if causal else None
            want = sdpa(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], attn_mask=tril)
            torch.testing.assert_close(got[b:b + 1], want)


def test_key_padding_mask_true_means_ignore():
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 8)
    kpm = torch.rand(2, 7, generator=g) < 0.4
    kpm[:, 0] = False
    got = fastattn.attention(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(got, sdpa(q, k, v, attn_mask=~kpm[:, None, None, :]))
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    x = rand(2, 7, 16)
    want, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    # the same module through fastattn.attention: nn.MultiheadAttention's True = ignore convention
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qh, kh, vh = (torch.nn.functional.linear(x, w[i * 16:(i + 1) * 16], b[i * 16:(i + 1) * 16])
                  .view(2, 7, 2, 8).transpose(1, 2) for i in range(3))
    o = fastattn.attention(qh, kh, vh, key_padding_mask=kpm).transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(mha.out_proj(o), want)


def test_gqa_is_repeated_heads():
    q, k, v = rand(2, 6, 5, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 8)
    torch.testing.assert_close(reference.attention(q, k, v), sdpa(q, k, v, enable_gqa=True))


def test_bias_and_bool_mask_broadcast():
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    bias = rand(3, 5, 7)
    torch.testing.assert_close(reference.attention(q, k, v, attn_bias=bias), sdpa(q, k, v, attn_mask=bias))
    m = torch.rand(2, 1, 5, 7, generator=g) < 0.7
    m[..., 0] = True
    torch.testing.assert_close(reference.attention(q, k, v, attn_mask=m), sdpa(q, k, v, attn_mask=m))


def test_dropout_with_keep_mask():
    q, k, v = rand(1, 2, 5, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    keep = torch.rand(1, 2, 5, 6, generator=g) > 0.3
    p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    want = (p * keep / 0.7) @ v
    torch.testing.assert_close(reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep), want)


def test_empty_rows_and_lse():
    q, k, v = rand(1, 1, 4, 8), rand(1, 1, 6, 8), rand(1, 1, 6, 8)
    m = torch.ones(4, 6, dtype=torch.bool)
    m[2] = False
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = reference.attention(q, k, v, attn_mask=m, return_lse=True)
    assert (out[0, 0, 2] == 0).all() and lse[0, 0, 2] == float("inf")
    s = (q @ k.transpose(-1, -2) / 8 ** 0.5)[0, 0]
    torch.testing.assert_close(lse[0, 0, [0, 1, 3]], torch.logsumexp(s[[0, 1, 3]], -1))
    grads = torch.autograd.grad(out.sum() + lse[0, 0, [0, 1, 3]].sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in grads)
    assert (grads[0][0, 0, 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_backend_computes_half_in_fp32(dtype):
    """Backend "torch" (the CPU default) computes fp16/bf16 in fp32 and rounds each result once, as torch's own
    kernels accumulate: a LayerNorm over values of 1000 (whose fp16 variance overflows), a softmax scaled past
    fp16's range and attention with scores of 1e4 stay within a rounding of float64 ("reference", the §5
    baseline, keeps the input dtype: its fp16 LayerNorm there is all zeros)."""
    x = (torch.randn(4, 64, generator=g) * 1000).to(dtype)
    want = torch.nn.functional.layer_norm(x.double(), (64,))
    got = fastattn.layer_norm(x, (64,), backend="torch")
    assert got.dtype == dtype and (got.double() - want).abs().max() <= 2 * want.abs().max() * torch.finfo(dtype).eps
    y, s = fastattn.add_layer_norm(x, x, (64,), backend="torch", prenorm=True)
    assert y.dtype == s.dtype == dtype and torch.equal(s, x + x)
    if dtype == torch.float16:
        assert (fastattn.layer_norm(x, (64,), backend="reference") == 0).all()
    p = fastattn.softmax(torch.tensor([[1e4, 0.0, -1e4]], dtype=dtype), scale=10.0, backend="torch")
    assert p.dtype == dtype and torch.equal(p.float(), torch.tensor([[1.0, 0.0, 0.0]]))
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) * s for s in (25.0, 25.0, 1.0))
    got = fastattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="torch")
    assert got.dtype == dtype and torch.isfinite(got).all()
    # the error of rounding q, k to the dtype (scores of ~1e4), not of computing in it
    inputs_rounded = reference.attention(*(t.to(dtype).double() for t in (q, k, v)))
    assert (got.double() - inputs_rounded).abs().max() <= 2 * torch.finfo(dtype).eps * v.abs().max()


@pytest.mark.parametrize("seed", range(6))
def test_varlen_padded_is_the_loop(seed):
    """attention_varlen_padded (what torch.compile traces: no shape from the data) gives the per-sequence loop's
    outputs, LSE and gradients: both alignments, windows, ALiBi per batch, dropout masks, GQA, a value head dim
    that differs, empty sequences and sequences longer on either side."""
    g = torch.Generator().manual_seed(seed)
    lens = [(int(a), int(b)) for a, b in torch.randint(0, 9, (4, 2), generator=g)]
    lens[seed % 4] = (0, 3) if seed % 2 else (5, 0)
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lq, lk))
    H, Hkv, D, Dv = 4, 2, 8, 8 + 4 * (seed % 2)
    q = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), Hkv, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(causal=seed % 3 == 0, bottom_right=seed % 2 == 0, window_size=((2, 1), (-1, -1), (3, -1))[seed % 3],
              alibi_slopes=torch.rand(4, H, generator=g) if seed % 2 else None, softcap=2.0 * (seed % 2),
              return_lse=True)
    if seed >= 4:
        kw.update(dropout_p=0.3, dropout_mask=torch.rand(4, H, max(lq), max(lk), generator=g) > 0.3)
    want = reference.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    got = reference.attention_varlen_padded(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw)
    go, gl = torch.randn_like(want[0]), torch.randn_like(want[1]).masked_fill(torch.isinf(want[1]), 0.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    ga = torch.autograd.grad((got[0] * go).sum() + (got[1].masked_fill(torch.isinf(got[1]), 0) * gl).sum(), (q, k, v))
    gb = torch.autograd.grad((want[0] * go).sum() + (want[1].masked_fill(torch.isinf(want[1]), 0) * gl).sum(),
                             (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_varlen_on_torch_compiles_whole():
    """A packed batch on backend "torch" (the CPU's) traces with fullgraph=True and inductor: the padded form,
    equal to eager's per-sequence loop."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, 2, 8, generator=g, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        out, lse = fastattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7,
                                      causal=True, causal_alignment="bottom_right", return_lse=True, backend="torch")
        return out, lse
    got, want = torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gq = torch.autograd.grad(got[0].sum(), q)[0]
    torch.testing.assert_close(gq, torch.autograd.grad(want[0].sum(), q)[0], rtol=1e-5, atol=1e-5)
