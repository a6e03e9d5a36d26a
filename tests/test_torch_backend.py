"""Backend "torch" (the CPU default; fp64 and head dims > 256 on a GPU): torch's SDPA where it computes the call,
the reference over chunks of query rows elsewhere. Both against the float64 reference under DESIGN §5, and the
memory each holds: no tensor of B·H·Lq·Lk scores."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import reference
from fastattn.ops import attention as ops
from fastattn.testing import AttentionCase, random_qkv, run_attention_case

import conftest


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while the mode is on (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.fixture
def sdpa_calls(monkeypatch):
    """A list that records each torch SDPA call the backend makes, with its mask's shape (None: no mask)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append(None if kw.get("attn_mask") is None else tuple(kw["attn_mask"].shape))
        return sdpa(*args, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def chunk_rows(monkeypatch, rows, case):
    """Chunks of ``rows`` query rows for ``case``'s shapes."""
    Lk = case.Lk if case.varlen is None else max(lk for _, lk in case.varlen)
    B = case.B if case.varlen is None else 1  # a packed batch runs one sequence at a time
    monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", rows * B * case.H * Lk)


# ------------------------------------------------------------------------------------------- SDPA
SDPA_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal-br": dict(causal=True, alignment="bottom_right", Lq=9, Lk=23),
    "causal-br-longer-q": dict(causal=True, alignment="bottom_right", Lq=23, Lk=9),
    "kv_lens": dict(kv_lens=True),
    "kv_lens+causal-br": dict(kv_lens=True, causal=True, alignment="bottom_right"),
    "key_padding+causal": dict(key_padding=True, causal=True),
    "mask-full": dict(bool_mask="full"),
    "mask-2d+causal": dict(bool_mask="2d", causal=True),
    "bias-heads": dict(bias="heads"),
    "bias-batch+key_padding": dict(bias="batch", key_padding=True),
    "bias-rows+causal": dict(bias="rows", causal=True),  # broadcast over the keys: a last dim of 1
    "bias-head": dict(bias="head"),
    "gqa": dict(H=4, Hkv=2, causal=True),
    "d300": dict(D=300),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", SDPA_CASES)
def test_sdpa_where_it_computes_the_call(name, dtype, sdpa_calls):
    """Causal both ways, kv_lens, padding, bool masks, a bias without gradient, GQA, head dims over 256: one torch
    SDPA call (its CPU flash kernel), the rule met for the output and every gradient, and rows with no visible
    key 0 with gradients 0 (the cases leave some)."""
    case = AttentionCase(dtype=dtype, lse=False, seed=len(name), **{"Lq": 17, "Lk": 23, **SDPA_CASES[name]})
    conftest.assert_case(run_attention_case, case, "cpu", "torch")
    assert len(sdpa_calls) == 1, sdpa_calls


@pytest.mark.parametrize("name", ["lse", "bias-grad", "window", "alibi", "softcap", "sinks"])
def test_what_sdpa_cannot_compute_runs_the_reference(name, sdpa_calls):
    """What SDPA does not compute (or computes on its math path: a bias's gradient) runs the reference, and meets
    the rule. (Dropout too: test_chunked_dropout_backward_redraws_the_same_mask.)"""
    opts = {"lse": dict(lse=True, lse_grad=True), "bias-grad": dict(bias="full", bias_grad=True),
            "window": dict(window=(3, 2)), "alibi": dict(alibi="heads"), "softcap": dict(softcap=5.0),
            "sinks": dict(sinks=True)}[name]
    case = AttentionCase(dtype=torch.float32, causal=True, **{"lse": False, **opts})
    conftest.assert_case(run_attention_case, case, "cpu", "torch")
    assert sdpa_calls == []


@pytest.mark.parametrize("Lk", [6, 9])
def test_a_query_row_holding_nan_gives_nan(Lk, sdpa_calls):
    """torch's CPU kernel returns 0 for a query row holding NaN (at some lengths: here 6, not 9); the backend
    propagates NaN and inf as the reference does."""
    q, k, v = random_qkv(1, 2, 6, Lk, 8, dtype=torch.float32, requires_grad=False)
    q[0, 1, 2, 3], q[0, 0, 4, 0] = float("nan"), float("inf")
    out = fastattn.attention(q, k, v, backend="torch")
    want = reference.attention(q, k, v)
    assert torch.equal(out.isnan(), want.isnan()) and out[0, 1, 2].isnan().all() and out[0, 0, 4].isnan().all()
    assert torch.isfinite(out[0, 0, :4]).all() and len(sdpa_calls) == 1


def test_a_row_the_causal_mask_and_a_bias_hide_together_is_empty(sdpa_calls):
    """Row 0 sees key 0 only (causal), which the bias hides, while the bias alone leaves it key 1: 0, as the
    reference; and a NaN bias where causal attention hides it changes nothing."""
    q, k, v = random_qkv(1, 1, 3, 3, 4, dtype=torch.float64)
    inf = float("inf")
    bias = torch.tensor([[-inf, 0.0, -inf], [0.0, 0.0, float("nan")], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = fastattn.attention(q, k, v, causal=True, attn_bias=bias, backend="torch")
    want = fastattn.attention(q, k, v, causal=True, attn_bias=bias, backend="reference")
    assert (out[0, 0, 0] == 0).all() and torch.isfinite(out).all() and len(sdpa_calls) == 1
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)
    do = torch.randn_like(out)  # finite gradients: the empty row's score, -inf, stays out of the backward
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_a_row_of_huge_finite_scores_runs_the_reference(sdpa_calls):
    """A row whose every bias is finfo.min (Hugging Face's additive masks): the reference averages v uniformly;
    SDPA's LSE would absorb log Lk and its backward take p = 1 for 1/Lk (gradients Lk times too large). Such a
    call runs the reference; the output and gradients match it."""
    q, k, v = random_qkv(1, 2, 6, 6, 4, dtype=torch.float64)
    bias = torch.zeros(6, 6, dtype=torch.float64)
    bias[2] = torch.finfo(torch.float64).min
    got = fastattn.attention(q, k, v, attn_bias=bias, backend="torch")
    want = fastattn.attention(q, k, v, attn_bias=bias, backend="reference")
    do = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert sdpa_calls == []
    fastattn.attention(q, k, v, attn_bias=bias.clamp(min=-1e4), backend="torch")  # -1e4 is no problem
    assert len(sdpa_calls) == 1


@pytest.mark.parametrize("path", ["sdpa", "chunks"])
def test_padding_keys_are_never_read(path, monkeypatch):
    """Keys past kv_lens may hold NaN without touching the result or the other gradients (0 there), as in the
    kernels."""
    if path == "chunks":
        monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", 2 * 2 * 40 * 4)
    q, k, v = random_qkv(2, 2, 30, 40, 8, dtype=torch.float32)
    kv_lens = torch.tensor([17, 33], dtype=torch.int32)
    kp, vp = k.detach().clone(), v.detach().clone()
    for b, n in enumerate(kv_lens.tolist()):
        kp[b, :, n:], vp[b, :, n:] = float("nan"), float("nan")
    kp.requires_grad_()
    vp.requires_grad_()
    out = fastattn.attention(q, kp, vp, kv_lens=kv_lens, causal=True, causal_alignment="bottom_right",
                             backend="torch")
    want = fastattn.attention(q, k, v, kv_lens=kv_lens, causal=True, causal_alignment="bottom_right",
                              backend="torch")
    assert torch.equal(out, want)
    dq, dk, dv = torch.autograd.grad(out, (q, kp, vp), torch.ones_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    for b, n in enumerate(kv_lens.tolist()):
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()


def test_a_mask_larger_than_a_chunk_runs_the_chunks(sdpa_calls, monkeypatch):
    """Causal attention with a padding mask needs an Lq × Lk mask per batch for SDPA: past TORCH_CHUNK_SCORES
    elements the call runs the reference in chunks instead, and holds no tensor that large."""
    B, H, L = 2, 2, 64
    q, k, v = random_qkv(B, H, L, L, 8, dtype=torch.float32)
    kpm = torch.rand(B, L) < 0.2
    monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", B * L * L - 1)
    with LargestTensor() as seen:
        out = fastattn.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="torch")
        out.sum().backward()
    assert sdpa_calls == [] and seen.most < B * L * L
    monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", B * L * L)
    torch.testing.assert_close(fastattn.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="torch"), out)
    assert sdpa_calls == [(B, 1, L, L)]


# ------------------------------------------------------------------------------------------- row chunks
CHUNK_CASES = {
    "plain-lse": dict(lse_grad=True),
    "causal-br+kv_lens": dict(causal=True, alignment="bottom_right", kv_lens=True, Lq=13, Lk=29),
    "causal-tl-longer-q": dict(causal=True, Lq=29, Lk=13, lse_grad=True),
    "key_padding+bias-full-grad": dict(key_padding=True, bias="full", bias_grad=True),
    "bias-rows-grad": dict(bias="rows", bias_grad=True, key_padding=True),
    "window+alibi-batch": dict(window=(4, 2), alibi="batch", alignment="bottom_right", Lq=19, Lk=27),
    "softcap+sinks+gqa": dict(softcap=3.0, sinks=True, H=4, Hkv=2, causal=True),
    "varlen": dict(varlen=((7, 7), (0, 4), (12, 20), (9, 3)), causal=True, alignment="bottom_right", lse_grad=True),
}


@pytest.mark.parametrize("name", CHUNK_CASES)
def test_row_chunks_meet_the_rule(name, monkeypatch):
    """The reference over chunks of 5 query rows (the last one shorter), each recomputed in the backward: every
    feature the diagonal touches (both alignments, windows, ALiBi), masks and biases sliced by rows, and their
    gradients."""
    case = AttentionCase(dtype=torch.float32, seed=len(name), **{"Lq": 23, "Lk": 19, **CHUNK_CASES[name]})
    chunk_rows(monkeypatch, 5, case)
    starts, attention = [], reference.attention

    def spy(*args, q_start=0, **kw):
        starts.append(q_start)
        return attention(*args, q_start=q_start, **kw)
    monkeypatch.setattr(reference, "attention", spy)
    conftest.assert_case(run_attention_case, case, "cpu", "torch")
    assert 5 in starts and 10 in starts  # chunked, and recomputed: each start at least twice
    assert all(starts.count(s) >= 2 for s in starts if s)


def test_a_part_of_a_longer_call():
    """reference.attention(q_start=, q_total=, k_start=, k_total=) on rows 4..8 and the keys they see gives those
    rows of the whole call: the diagonal of both alignments, kv_lens and ALiBi counted from the whole call's
    first row and key."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g, dtype=torch.float64) for L in (11, 15, 15))
    kv_lens = torch.tensor([15, 6], dtype=torch.int32)
    slopes = fastattn.alibi_slopes(3)
    for kw, (k0, k1) in ((dict(causal=True), (0, 9)), (dict(causal=True, bottom_right=True, kv_lens=kv_lens), (0, 13)),
                         (dict(window_size=(2, 3), alibi_slopes=slopes, bottom_right=True), (6, 15)),
                         (dict(window_size=(1, 0), alibi_slopes=slopes, kv_lens=kv_lens), (3, 9))):
        whole = reference.attention(q, k, v, return_lse=True, **kw)
        part = reference.attention(q[:, :, 4:9], k[:, :, k0:k1], v[:, :, k0:k1], return_lse=True, q_start=4,
                                   q_total=11, k_start=k0, k_total=15, **kw)
        torch.testing.assert_close(part[0], whole[0][:, :, 4:9], rtol=0, atol=1e-14)
        torch.testing.assert_close(part[1], whole[1][:, :, 4:9], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(4, 2)),
                                dict(causal=True, causal_alignment="bottom_right", window_size=(5, -1))],
                         ids=["causal", "window", "causal-br-window"])
def test_chunks_compute_only_the_keys_their_rows_see(kw, monkeypatch):
    """A chunk of 8 rows computes the keys its rows' diagonals reach, no more (causal: up to its last row's;
    a window (4, 2): 8 + 4 + 2 keys), and gives the whole call's output and gradients (float64)."""
    B, H, Lq, Lk = 2, 2, 64, 70
    q, k, v = random_qkv(B, H, Lq, Lk, 8, dtype=torch.float64)
    monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", 8 * B * H * Lk)
    shapes, attention = [], reference.attention

    def spy(q, k, v, **opts):
        shapes.append((opts["q_start"], opts["k_start"], q.shape[2], k.shape[2]))
        return attention(q, k, v, **opts)
    monkeypatch.setattr(reference, "attention", spy)
    got = fastattn.attention(q, k, v, backend="torch", return_lse=True, **kw)
    grads = torch.autograd.grad(got[0].sum() + got[1].sum(), (q, k, v))
    monkeypatch.setattr(reference, "attention", attention)
    want = fastattn.attention(q, k, v, backend="reference", return_lse=True, **kw)
    for a, b in zip((*got, *grads), (*want, *torch.autograd.grad(want[0].sum() + want[1].sum(), (q, k, v)))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    diag = 0 if kw.get("causal_alignment") != "bottom_right" else Lk - Lq
    for i0, k0, rows, keys in shapes:
        left, right = kw.get("window_size", (-1, -1))
        right = 0 if kw.get("causal") else right
        assert k0 == (max(0, i0 + diag - left) if left >= 0 else 0)
        assert k0 + keys == min(Lk, i0 + rows + diag + right)


def test_chunked_dropout_backward_redraws_the_same_mask(monkeypatch):
    """Each chunk draws its keep-mask, and its recomputation in the backward draws it again from the saved RNG
    state: gradcheck (float64) passes, and torch.manual_seed reproduces the output."""
    monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", 3 * 2 * 9)  # chunks of 3 rows
    q, k, v = random_qkv(1, 2, 8, 9, 4, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(5)
        return fastattn.attention(q, k, v, causal=True, dropout_p=0.4, backend="torch")
    out = fn(q, k, v)
    assert torch.equal(out, fn(q, k, v)) and not torch.allclose(out, reference.attention(q, k, v, causal=True))
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("path", ["sdpa", "chunks"])
def test_no_tensor_of_all_the_scores(path, monkeypatch):
    """Forward and backward hold no tensor of B·H·Lq·Lk scores: SDPA's CPU kernel, or chunks of at most
    TORCH_CHUNK_SCORES (here 1/16 of them); none larger than q. The reference, for contrast, does."""
    B, H, L, D = 2, 2, 256, 16
    q, k, v = random_qkv(B, H, L, L, D, dtype=torch.float32)
    monkeypatch.setattr(ops, "TORCH_CHUNK_SCORES", B * H * L * L // 16)
    kw = dict(causal=True) if path == "sdpa" else dict(causal=True, return_lse=True, softcap=4.0)
    for backend, most in (("torch", max(B * H * L * L // 16, q.numel())), ("reference", B * H * L * L)):
        with LargestTensor() as seen:
            out = fastattn.attention(q, k, v, backend=backend, **kw)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert seen.most <= most, (backend, seen.most)
        if backend == "reference":
            assert seen.most == most
