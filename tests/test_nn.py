"""Drop-in modules against their torch.nn twins, the reference Transformer fused vs unfused, swap_modules, HF.

Each comparison follows DESIGN.md §5: the fastattn module (real Triton kernels, under the interpreter on a CPU
machine) in the test dtype against the torch twin in float64 (ref64) and in the same dtype (baseline), for the
output and the gradients of every input and parameter.
"""
import copy
import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastattn
import fastattn.nn as fnn
from fastattn.testing import BACKWARD_FACTOR, FORWARD_FACTOR, compare

from conftest import DEVICE

KERNEL_BACKEND = "triton"


@pytest.fixture
def kernels(monkeypatch):
    """Route every fastattn op called with backend="auto" inside the modules to the Triton kernels."""
    monkeypatch.setenv("FASTATTN_BACKEND", KERNEL_BACKEND)


def _run(module, call, inputs, grad_out, dtype):
    """Output and gradients (inputs that require grad, and every parameter) of ``call(module, **inputs)``."""
    m = copy.deepcopy(module).to(device=DEVICE, dtype=dtype)
    ins = {}
    for n, t in inputs.items():
        if torch.is_tensor(t) and t.is_floating_point():
            t = t.detach().to(device=DEVICE, dtype=dtype).requires_grad_(t.requires_grad)
        elif torch.is_tensor(t):
            t = t.to(DEVICE)
        ins[n] = t
    out = call(m, **ins)
    leaves = {"d" + n: t for n, t in ins.items() if torch.is_tensor(t) and t.requires_grad}
    leaves.update({"d." + n: p for n, p in m.named_parameters() if p.requires_grad})
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device=DEVICE, dtype=dtype),
                                allow_unused=True)
    res = {"out": out}
    res.update({n: g for n, g in zip(leaves, grads) if g is not None})
    return res


def twin_comparisons(fast, twin, call, inputs, dtype, monkeypatch, zero_suffix=None):
    """fastattn ``fast`` in ``dtype`` vs torch ``twin`` in float64 and ``dtype``, same weights.

    Gradients whose exact value is 0 (``zero_suffix``: a key-projection bias adds the same q·b to every score of
    a row, which softmax cancels) are rounding noise in every implementation, so comparing two noises says
    nothing: those are checked to be 0 up to a few ulps of the largest gradient of their module instead."""
    with torch.no_grad():
        shape = call(copy.deepcopy(twin).to(DEVICE).double(), **{
            n: (t.to(DEVICE).double() if torch.is_tensor(t) and t.is_floating_point() else
                t.to(DEVICE) if torch.is_tensor(t) else t) for n, t in inputs.items()}).shape
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref64 = _run(twin, call, inputs, grad_out, torch.float64)
    low = _run(twin, call, inputs, grad_out, dtype)
    with monkeypatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", KERNEL_BACKEND)
        got = _run(fast, call, inputs, grad_out, dtype)
    assert set(got) == set(ref64), f"gradients differ in which tensors get one: {set(got) ^ set(ref64)}"
    if zero_suffix:
        for n in [n for n in got if n.endswith(zero_suffix)]:
            assert ref64[n].abs().max() < 1e-12, f"{n} is not identically zero in float64"
            module = n[: -len(zero_suffix)]
            scale = max(g.abs().max().item() for m, g in got.items() if m.startswith(module))
            noise = got.pop(n).abs().max().item()
            assert noise <= 64 * torch.finfo(dtype).eps * scale, f"{n}: {noise:.3e} is not 0 (scale {scale:.3e})"
    return [compare(got[n], ref64[n], low[n], name=n, factor=BACKWARD_FACTOR if n.startswith("d") else FORWARD_FACTOR)
            for n in got]


def assert_rule(comparisons):
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "\n".join(failed)


def _randn(*shape, seed=0, requires_grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def _kpm(B, S, seed=1):
    m = torch.rand(B, S, generator=torch.Generator().manual_seed(seed)) < 0.3
    m[:, 0] = False  # at least one key per sequence: torch's module gives NaN for an all-padded row
    return m


def _tensors(batch_first, B, L, E, seed):
    x = _randn(B, L, E, seed=seed)
    return x if batch_first else x.detach().transpose(0, 1).contiguous().requires_grad_()


# ------------------------------------------------------------------------------------------- MultiheadAttention
E, HEADS, B, LQ, LK = 16, 2, 2, 9, 13

MHA_CASES = {
    "self": dict(),
    "self-kpm": dict(kpm=True),
    "self-causal": dict(causal=True),
    "self-causal-kpm": dict(causal=True, kpm=True),
    # appended keys: torch's mask leaves them visible, so the hint does not replace it
    "self-causal-kpm-bias-kv-zero-attn": dict(causal=True, kpm=True, ctor=dict(add_bias_kv=True, add_zero_attn=True)),
    "cross-bool-mask": dict(cross=True, bool_mask=True),
    "cross-float-mask-kpm": dict(cross=True, float_mask=True, kpm=True),
    "cross-kdim-vdim": dict(cross=True, ctor=dict(kdim=12, vdim=20), kpm=True),
    "bias-kv-zero-attn": dict(cross=True, ctor=dict(add_bias_kv=True, add_zero_attn=True), kpm=True),
    "no-bias": dict(ctor=dict(bias=False), kpm=True),
}


def _assert_mha_twins(fast, twin, inputs, causal, monkeypatch):
    """fast and twin, called alike on inputs (self-attention where key/value are absent; causal: torch's future
    mask with is_causal), meet the rule in float32, forward and backward."""
    if causal:
        inputs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(LQ)

    def call(m, query, key=None, value=None, **kw):
        key = query if key is None else key
        value = query if value is None else value
        return m(query, key, value, need_weights=False, is_causal=causal, **kw)[0]

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float32, monkeypatch))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_matches_torch(name, batch_first, monkeypatch):
    spec = MHA_CASES[name]
    ctor = dict(batch_first=batch_first, **spec.get("ctor", {}))
    torch.manual_seed(0)
    twin = nn.MultiheadAttention(E, HEADS, **ctor)
    fast = fnn.MultiheadAttention(E, HEADS, **ctor)
    fast.load_state_dict(twin.state_dict())
    Lk = LK if spec.get("cross") else LQ
    kdim, vdim = ctor.get("kdim", E), ctor.get("vdim", E)
    inputs = dict(query=_tensors(batch_first, B, LQ, E, 1))
    if spec.get("cross"):
        inputs.update(key=_tensors(batch_first, B, Lk, kdim, 2), value=_tensors(batch_first, B, Lk, vdim, 3))
    if spec.get("kpm"):
        inputs["key_padding_mask"] = _kpm(B, Lk)
    if spec.get("bool_mask"):
        m = torch.rand(LQ, Lk, generator=torch.Generator().manual_seed(4)) < 0.3
        m[:, 0] = False
        inputs["attn_mask"] = m
    if spec.get("float_mask"):
        inputs["attn_mask"] = _randn(B * HEADS, LQ, Lk, seed=5, requires_grad=False)
    _assert_mha_twins(fast, twin, inputs, spec.get("causal", False), monkeypatch)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_causal_hint_with_padding_builds_no_square_mask(batch_first, monkeypatch):
    """is_causal with a key-padding mask (a decoder's self-attention over a padded batch): the kernels get
    causal=True and the [B, L] padding, no [B, 1, L, L] mask (torch reads its mask there: SDPA takes a mask or
    is_causal), and the result is torch's (test_multihead_attention_matches_torch[self-causal-kpm])."""
    import fastattn.nn.attention as module_code
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fastattn.attention(*args, **kwargs)
    monkeypatch.setattr(module_code, "attention", spy)
    m = fnn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    x = _tensors(batch_first, B, LQ, E, 1)
    kpm = _kpm(B, LQ)
    m(x, x, x, need_weights=False, key_padding_mask=kpm, is_causal=True,
      attn_mask=nn.Transformer.generate_square_subsequent_mask(LQ))
    (kw,) = calls
    assert kw["causal"] is True and kw["attn_bias"] is None
    assert torch.equal(kw["key_padding_mask"], kpm)
    with pytest.raises(ValueError, match="attn_mask of shape"):  # the mask the hint replaces is checked, as torch
        m(x, x, x, need_weights=False, key_padding_mask=kpm, is_causal=True, attn_mask=torch.zeros(LQ, LQ + 1))


def test_multihead_attention_fp16(monkeypatch):
    torch.manual_seed(0)
    twin = nn.MultiheadAttention(E, HEADS, batch_first=True)
    fast = fnn.MultiheadAttention(E, HEADS, batch_first=True)
    fast.load_state_dict(twin.state_dict())
    inputs = dict(query=_randn(B, LQ, E, seed=1), key_padding_mask=_kpm(B, LQ))

    def call(m, query, **kw):
        return m(query, query, query, need_weights=False, **kw)[0]

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float16, monkeypatch))


def test_multihead_attention_need_weights_is_torch(kernels):
    torch.manual_seed(0)
    twin = nn.MultiheadAttention(E, HEADS, batch_first=True)
    fast = fnn.MultiheadAttention(E, HEADS, batch_first=True)
    fast.load_state_dict(twin.state_dict())
    x, kpm = _randn(B, LQ, E, requires_grad=False), _kpm(B, LQ)
    for avg in (True, False):
        o1, w1 = twin(x, x, x, key_padding_mask=kpm, average_attn_weights=avg)
        o2, w2 = fast(x, x, x, key_padding_mask=kpm, average_attn_weights=avg)
        assert torch.equal(o1, o2) and torch.equal(w1, w2)


def test_multihead_attention_unbatched(monkeypatch):
    torch.manual_seed(0)
    twin, fast = nn.MultiheadAttention(E, HEADS), fnn.MultiheadAttention(E, HEADS)
    fast.load_state_dict(twin.state_dict())
    inputs = dict(query=_randn(LQ, E, seed=1), key_padding_mask=_kpm(1, LQ)[0])

    def call(m, query, **kw):
        return m(query, query, query, need_weights=False, **kw)[0]

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float32, monkeypatch))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    for a, b in ((nn.MultiheadAttention(E, HEADS, kdim=12, vdim=20), fnn.MultiheadAttention(E, HEADS, kdim=12, vdim=20)),
                 (nn.TransformerEncoderLayer(E, HEADS, 32), fnn.TransformerEncoderLayer(E, HEADS, 32)),
                 (nn.TransformerDecoderLayer(E, HEADS, 32), fnn.TransformerDecoderLayer(E, HEADS, 32))):
        assert a.state_dict().keys() == b.state_dict().keys()
        b.load_state_dict(a.state_dict())
        a.load_state_dict(b.state_dict())


@pytest.mark.parametrize("name", ["MultiheadAttention", "LayerNorm", "TransformerEncoderLayer",
                                  "TransformerDecoderLayer"])
def test_signatures_are_torch_nn(name):
    """Constructors and forwards take torch.nn's parameters: the same names, kinds and defaults, in order (what
    inspect and IDEs show); fastattn's extras are keyword-only or trailing with defaults."""
    import inspect

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    ours, theirs = getattr(fnn, name), getattr(nn, name)
    for method in ("__init__", "forward"):
        want = params(getattr(theirs, method))
        got = params(getattr(ours, method))
        assert got[:len(want)] == want, method
        extras = list(inspect.signature(getattr(ours, method)).parameters.values())[len(want):]
        assert all(p.default is not inspect.Parameter.empty for p in extras), method


def test_bad_masks_are_named(kernels):
    m = fnn.MultiheadAttention(E, HEADS, batch_first=True)
    x = _randn(B, LQ, E, requires_grad=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(B, LQ + 1, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(LQ, LQ + 1, dtype=torch.bool), need_weights=False)
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(LQ, LQ, dtype=torch.int32), need_weights=False)
    with pytest.raises(RuntimeError, match="is_causal"):
        m(x, x, x, is_causal=True, need_weights=False)


# ------------------------------------------------------------------------------------------- local attention, ALiBi
class _ReferenceLocalMHA(nn.MultiheadAttention):
    """The twin of fnn.MultiheadAttention(window_size=..., alibi=...): torch's parameters, attention by
    fastattn.reference (batch_first, self- or cross-attention, separate q/k/v projections of the packed weight)."""

    def __init__(self, *args, window_size=None, alibi=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = dict(window_size=window_size or (-1, -1), alibi=alibi)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                is_causal=False):
        from fastattn import reference

        assert self.batch_first and not need_weights
        E, H = self.embed_dim, self.num_heads
        (wq, wk, wv), (bq, bk, bv) = self.in_proj_weight.split(E), self.in_proj_bias.split(E)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (H, E // H)).transpose(1, 2)
                   for x, w, b in ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
        attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if attn_mask is not None and not is_causal:
            raise NotImplementedError("the twin takes key_padding_mask and is_causal only")
        slopes = reference.alibi_slopes(H).to(q.device) if self.local["alibi"] else None
        out = reference.attention(q, k, v, causal=is_causal, attn_mask=attend, window_size=self.local["window_size"],
                                  alibi_slopes=slopes)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None


LOCAL_CASES = {
    "window": dict(window_size=(3, 2), kpm=True),
    "causal-window": dict(window_size=(4, -1), causal=True),  # kernel causal + window, no mask
    "causal-window-kpm": dict(window_size=(2, 1), causal=True, kpm=True),  # torch rule: attn_mask used
    "alibi": dict(alibi=True, kpm=True),
    "alibi-causal-window": dict(alibi=True, window_size=(5, 0), causal=True),
    "cross-window": dict(window_size=(2, 5), cross=True, kpm=True),  # Lq != Lk, top-left diagonal
    "cross-alibi": dict(alibi=True, cross=True),
}


@pytest.mark.parametrize("name", list(LOCAL_CASES))
def test_multihead_attention_local_matches_reference(name, monkeypatch):
    spec = LOCAL_CASES[name]
    ctor = dict(batch_first=True, window_size=spec.get("window_size"), alibi=spec.get("alibi", False))
    torch.manual_seed(0)
    twin, fast = _ReferenceLocalMHA(E, HEADS, **ctor), fnn.MultiheadAttention(E, HEADS, **ctor)
    fast.load_state_dict(twin.state_dict())
    Lk = LK if spec.get("cross") else LQ
    inputs = dict(query=_randn(B, LQ, E, seed=1))
    if spec.get("cross"):
        inputs.update(key=_randn(B, Lk, E, seed=2), value=_randn(B, Lk, E, seed=3))
    if spec.get("kpm"):
        inputs["key_padding_mask"] = _kpm(B, Lk)
    _assert_mha_twins(fast, twin, inputs, spec.get("causal", False), monkeypatch)


def test_multihead_attention_local_fp16(monkeypatch):
    """.half() keeps the ALiBi slopes float32 (the kernels take fp32 slopes, not re-rounded ones)."""
    ctor = dict(batch_first=True, window_size=(3, 0), alibi=True)
    torch.manual_seed(0)
    twin, fast = _ReferenceLocalMHA(E, HEADS, **ctor), fnn.MultiheadAttention(E, HEADS, **ctor)
    fast.load_state_dict(twin.state_dict())
    assert fast.half().alibi_slopes.dtype == torch.float32
    assert torch.equal(fast.alibi_slopes, fastattn.alibi_slopes(HEADS))
    inputs = dict(query=_randn(B, LQ, E, seed=1), key_padding_mask=_kpm(B, LQ))

    def call(m, query, **kw):
        return m(query, query, query, need_weights=False, **kw)[0]

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float16, monkeypatch))


def test_multihead_attention_local_options_api(kernels):
    """Keyword-only extras; state_dict as torch's; bad values named; need_weights refused; swap defaults."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(E, HEADS, batch_first=True)
    m = fnn.MultiheadAttention(E, HEADS, batch_first=True, window_size=(2, 0), alibi=True)
    assert m.state_dict().keys() == plain.state_dict().keys() and "alibi_slopes" in dict(m.named_buffers())
    m.load_state_dict(plain.state_dict())
    plain.load_state_dict(m.state_dict())
    x = _randn(B, LQ, E, requires_grad=False)
    with pytest.raises(ValueError, match="need_weights"):
        m(x, x, x)
    for bad in ((2,), (1, -2), (1.0, 0), 3, (True, 0)):
        with pytest.raises(ValueError, match="window_size"):
            fnn.MultiheadAttention(E, HEADS, window_size=bad)
    with pytest.raises(ValueError, match="add_bias_kv"):
        fnn.MultiheadAttention(E, HEADS, add_bias_kv=True, alibi=True)
    with pytest.raises(TypeError):  # keyword-only: torch's positional signature is unchanged
        fnn.MultiheadAttention(E, HEADS, 0.0, True, False, False, None, None, True, None, None, (2, 0))
    # swap_modules re-classes without __init__: the class-level defaults make it plain (no window, no ALiBi),
    # and need_weights=True still takes torch's path.
    swapped = fnn.swap_modules(copy.deepcopy(plain))
    assert type(swapped) is fnn.MultiheadAttention and swapped.window_size is None and not swapped.alibi
    want = plain(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(swapped(x, x, x, need_weights=False)[0], want, atol=1e-5, rtol=1e-4)
    assert torch.equal(swapped(x, x, x)[0], plain(x, x, x)[0])
    # The options change the result (they are not silently dropped).
    assert (m(x, x, x, need_weights=False)[0] - want).abs().max() > 1e-2


def test_multihead_attention_alibi_after_meta_device_and_reset():
    """The ALiBi slopes (a non-persistent buffer: no state_dict restores them) are real after to_empty() from a
    meta-device module and after _reset_parameters(), not uninitialised memory."""
    m = fnn.MultiheadAttention(E, HEADS, alibi=True, device="meta").to_empty(device="cpu")
    assert torch.equal(m.alibi_slopes, fastattn.alibi_slopes(HEADS))
    m.alibi_slopes.fill_(0.0)
    m._reset_parameters()
    assert torch.equal(m.alibi_slopes, fastattn.alibi_slopes(HEADS))
    assert m.half().alibi_slopes.dtype == torch.float32


def test_multihead_attention_nested_inputs_take_torch_fast_path():
    """Nested tensors (eval, inference mode, batch_first self-attention) run torch's fast path, as on
    torch.nn.MultiheadAttention; fastattn's layers refuse them with a clear error."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    m = fnn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    m.load_state_dict(plain.state_dict())
    x = torch.nested.nested_tensor([torch.randn(5, E), torch.randn(3, E)])
    with torch.inference_mode():
        got, want = m(x, x, x, need_weights=False)[0], plain(x, x, x, need_weights=False)[0]
    for a, b in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(a, b)
    layer = fnn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True).eval()
    with torch.inference_mode(), pytest.raises(ValueError, match="nested tensors"):
        layer(x)


def test_multihead_attention_4d_mask_with_causal_hint_is_refused():
    """attn_mask must be 2-d or 3-d, also with the is_causal hint (which drops the mask): torch refuses it."""
    m = fnn.MultiheadAttention(E, HEADS, batch_first=True)
    x = _randn(B, LQ, E, requires_grad=False)
    with pytest.raises(ValueError, match="2-d or 3-d"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(1, 1, LQ, LQ), is_causal=True)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_layers_under_autocast_as_torch(norm_first):
    """Mixed precision: each sublayer's bf16 output meets the fp32 residual stream; the fused add + LayerNorm
    promotes as torch's x + sublayer(x) does (it once raised a dtype mismatch), so outputs match torch's."""
    torch.manual_seed(0)
    pairs = [(nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True, norm_first=norm_first),
              fnn.TransformerEncoderLayer), (nn.TransformerDecoderLayer(E, HEADS, 32, dropout=0.0,
                                                                         batch_first=True, norm_first=norm_first),
                                             fnn.TransformerDecoderLayer)]
    x, mem = _randn(B, LQ, E, requires_grad=False), _randn(B, LQ + 3, E, requires_grad=False)
    for twin, cls in pairs:
        fast = cls(E, HEADS, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        fast.load_state_dict(twin.state_dict())
        args = (x,) if cls is fnn.TransformerEncoderLayer else (x, mem)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = fast(*args), twin(*args)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------- Transformer layers
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_layer_matches_torch(norm_first, batch_first, monkeypatch):
    torch.manual_seed(0)
    ctor = dict(d_model=E, nhead=HEADS, dim_feedforward=32, dropout=0.0, batch_first=batch_first,
                norm_first=norm_first, activation="gelu")
    twin, fast = nn.TransformerEncoderLayer(**ctor), fnn.TransformerEncoderLayer(**ctor)
    fast.load_state_dict(twin.state_dict())
    inputs = dict(src=_tensors(batch_first, B, LQ, E, 1), src_key_padding_mask=_kpm(B, LQ),
                  src_mask=nn.Transformer.generate_square_subsequent_mask(LQ))

    def call(m, **kw):
        return m(is_causal=True, **kw)

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float32, monkeypatch))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_decoder_layer_matches_torch(norm_first, monkeypatch):
    torch.manual_seed(0)
    ctor = dict(d_model=E, nhead=HEADS, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=norm_first)
    twin, fast = nn.TransformerDecoderLayer(**ctor), fnn.TransformerDecoderLayer(**ctor)
    fast.load_state_dict(twin.state_dict())
    inputs = dict(tgt=_randn(B, LQ, E, seed=1), memory=_randn(B, LK, E, seed=2),
                  tgt_mask=nn.Transformer.generate_square_subsequent_mask(LQ), memory_key_padding_mask=_kpm(B, LK))

    def call(m, **kw):
        return m(tgt_is_causal=True, **kw)

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float32, monkeypatch))


# ------------------------------------------------------------------------------------------- reference Transformer
VOCAB = 11


def _tokens(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB, (B, L), generator=g)
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    lens[0] = L
    t[torch.arange(L)[None, :] >= lens[:, None]] = 0  # right padding with pad_id 0
    return t


def _small_transformer(fused, **kw):
    torch.manual_seed(0)
    return fnn.Transformer(VOCAB, VOCAB, d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=32, dropout=0.0, max_len=64, fused=fused, **kw)


def test_positional_encoding_formula():
    pe = fnn.SinusoidalPositionalEncoding(6, max_len=10)
    x = torch.zeros(1, 10, 6)
    p, i = 7, 2  # PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)
    assert math.isclose(pe(x)[0, p, 2 * i].item(), math.sin(p / 10000 ** (2 * i / 6)), rel_tol=1e-6)
    assert math.isclose(pe(x)[0, p, 2 * i + 1].item(), math.cos(p / 10000 ** (2 * i / 6)), rel_tol=1e-6)


def test_transformer_fused_matches_unfused(monkeypatch):
    fused, twin = _small_transformer(True), _small_transformer(False)
    twin.load_state_dict(fused.state_dict())
    src, tgt = _tokens(B, 10, 1), _tokens(B, 7, 2)
    assert (src == 0).any() and (tgt == 0).any()

    def call(m, src, tgt):
        return m(src, tgt)

    assert_rule(twin_comparisons(fused, twin, call, dict(src=src, tgt=tgt), torch.float32, monkeypatch,
                                 zero_suffix="k_proj.bias"))


def test_transformer_training_trajectory(kernels):
    """A few AdamW steps from the same weights and data give the same losses, fused and unfused."""
    losses = {}
    for fused in (True, False):
        model = _small_transformer(fused).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[fused] = []
        for step in range(4):
            src, tgt = _tokens(4, 10, 10 + step).to(DEVICE), _tokens(4, 8, 20 + step).to(DEVICE)
            logits = model(src, tgt[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[fused].append(loss.item())
    assert losses[True][-1] < losses[True][0]
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-4 * abs(b), (losses[True], losses[False])


# ------------------------------------------------------------------------------------------- swap_modules
def test_swap_modules_on_torch_transformer(monkeypatch):
    torch.manual_seed(0)
    twin = nn.Transformer(d_model=E, nhead=HEADS, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32,
                          dropout=0.0, batch_first=True)
    fast = fnn.swap_modules(copy.deepcopy(twin))
    kinds = {type(m) for m in fast.modules()}
    assert {fnn.MultiheadAttention, fnn.LayerNorm, fnn.TransformerEncoderLayer, fnn.TransformerDecoderLayer} <= kinds
    assert not {nn.MultiheadAttention, nn.LayerNorm, nn.TransformerEncoderLayer} & kinds
    inputs = dict(src=_randn(B, LK, E, seed=1), tgt=_randn(B, LQ, E, seed=2),
                  tgt_mask=nn.Transformer.generate_square_subsequent_mask(LQ),
                  src_key_padding_mask=_kpm(B, LK), memory_key_padding_mask=_kpm(B, LK))

    def call(m, **kw):
        return m(tgt_is_causal=True, **kw)

    assert_rule(twin_comparisons(fast, twin, call, inputs, torch.float32, monkeypatch))


def test_swap_modules_keeps_weights_and_selects():
    model = nn.Sequential(nn.LayerNorm(E), nn.MultiheadAttention(E, HEADS))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    fnn.swap_modules(model, attention=False)
    assert type(model[0]) is fnn.LayerNorm and type(model[1]) is nn.MultiheadAttention
    fnn.swap_modules(model)
    assert type(model[1]) is fnn.MultiheadAttention
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(TypeError, match="model"):
        fnn.swap_modules("not a model")


def test_encoder_inference_does_not_take_nested_fast_path(kernels):
    """torch.nn.TransformerEncoder turns padded inputs into nested tensors for its own layers in inference;
    fastattn layers must still be the ones that run (and give torch's numbers on the non-padded rows)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
    twin = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval().to(DEVICE)
    fast = fnn.swap_modules(copy.deepcopy(twin))
    x, kpm = _randn(B, LQ, E, requires_grad=False).to(DEVICE), _kpm(B, LQ).to(DEVICE)
    calls = []
    fast.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        got, want = fast(x, src_key_padding_mask=kpm), twin(x, src_key_padding_mask=kpm)
    assert calls and not got.is_nested
    want = want.to_padded_tensor(0.0, got.shape) if want.is_nested else want
    keep = ~kpm
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_model_attn_implementation(kernels):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, attn_implementation="sdpa")
    model = transformers.BertModel(cfg).eval().to(DEVICE)
    ids = torch.randint(1, 50, (2, 9)).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        fnn.swap_modules(model)
        assert model.config._attn_implementation == "fastattn"
        assert type(model.embeddings.LayerNorm) is fnn.LayerNorm
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_t5_position_bias(kernels):
    """T5 passes its relative position bias as ``position_bias``: added to the scores with its gradient, as eager
    (it was dropped: logits off by 3e-2, no gradient for the bias table). Inputs that cannot be applied (sparse
    indices) raise instead of being ignored."""
    import transformers

    fnn.register_hf_attention()
    cfg = transformers.T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, 6:] = 0
    results = []
    for impl in ("eager", "fastattn"):
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation=impl).eval().to(DEVICE)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
        logits.square().mean().backward()
        bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        results.append((logits.detach(), bias.grad))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_g, want_g, atol=1e-6, rtol=1e-4)
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    for name, what in (("indices", "sparse attention indices"), ("sinks", "per-row attention sinks")):
        with pytest.raises(NotImplementedError, match=what):
            fnn.hf.attention_forward(nn.Module(), q, q, q, None, **{name: torch.zeros(2)})


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_gpt_oss_sinks(kernels):
    """GPT-OSS passes its learnable per-head sink logits as ``s_aux`` (sliding and full layers, GQA): logits, the
    sinks' gradients and cached decoding steps as eager's; with the sinks pushed to −30 (no weight) the logits
    move clearly, so they are not dropped."""
    import transformers

    fnn.register_hf_attention()
    cfg = transformers.GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ids, mask = _hf_inputs(2, 11, padded=True, seed=2)
    keep = mask.bool()
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(3)) * 2 + 1

    def run(impl, shift=0.0):
        torch.manual_seed(0)
        model = transformers.GptOssForCausalLM._from_config(cfg, attn_implementation=impl).to(DEVICE)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(sinks + shift)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[keep].square().mean().backward()
        grads = torch.stack([layer.self_attn.sinks.grad for layer in model.model.layers])
        past, steps = transformers.DynamicCache(config=model.config), []
        with torch.no_grad():
            for lo, hi in [(0, 6)] + [(t, t + 1) for t in range(6, ids.shape[1])]:
                out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], past_key_values=past,
                            use_cache=True)
                steps.append(out.logits[:, -1])
        return logits.detach()[keep], grads, torch.stack(steps, 1)

    want, got = run("eager"), run("fastattn")
    for name, a, b, atol in zip(("logits", "sinks' gradients", "decoding"), got, want, (2e-5, 1e-9, 2e-5)):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert want[1].abs().min() > 0
    assert (run("fastattn", shift=-30.0)[0] - want[0]).abs().max() > 1e-2


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_decoder_gqa(kernels):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval().to(DEVICE)
    ids = torch.randint(1, 50, (2, 9)).to(DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = fnn.swap_modules(model)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_mla_value_head_dim(kernels):
    """DeepSeek-V3's multi-head latent attention hands over q/k of head dim 24 (16 + 8 rotary) and v of 12: the
    kernels run v zero-padded (the value head dim had to equal q's); logits as eager's."""
    import transformers

    fnn.register_hf_attention()
    cfg = transformers.DeepseekV3Config(
        vocab_size=60, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, max_position_embeddings=64, n_group=1, topk_group=1)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for impl in ("eager", "fastattn"):
        torch.manual_seed(0)
        model = transformers.DeepseekV3ForCausalLM._from_config(cfg, attn_implementation=impl).eval().to(DEVICE)
        with torch.no_grad():
            results.append(model(input_ids=ids).logits)
    torch.testing.assert_close(results[1], results[0], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- HF: sliding window, softcap
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")
SLIDING = 4  # tokens per window; every sequence below is longer, so the window changes the result


def _hf_local_lm(kind, **overrides):
    """A tiny random causal LM with sliding-window layers (Gemma 2 also soft-caps the logits); query and key
    projections scaled up so scores reach a few units and the soft cap (1.0) changes them. Same weights for the
    same ``kind`` whatever ``overrides`` say."""
    import transformers

    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, attn_implementation="eager")
    if kind == "gemma2":  # layer 0 sliding, layer 1 full attention
        cfg = transformers.Gemma2Config(**common, sliding_window=SLIDING, attn_logit_softcapping=1.0,
                                        final_logit_softcapping=None, query_pre_attn_scalar=16)
        cls = transformers.Gemma2ForCausalLM
    else:  # every layer sliding
        cfg = transformers.MistralConfig(**common, sliding_window=SLIDING)
        cls = transformers.MistralForCausalLM
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12.0)
    return model.to(DEVICE)


def _hf_inputs(B, L, padded, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padded:
        mask[1, : L // 3] = 0  # left padding (generation's convention)
    return ids.to(DEVICE), mask.to(DEVICE)


@needs_transformers
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_hf_sliding_window_softcap_logits(kind, padded, kernels):
    """attn_implementation="fastattn" gives eager's logits for models with sliding-window layers and soft-capped
    logits; the same models without window / cap give clearly different logits (the options are not dropped)."""
    ids, mask = _hf_inputs(2, 13, padded)
    model = _hf_local_lm(kind)
    plain = _hf_local_lm(kind, sliding_window=10_000, **({"attn_logit_softcapping": None} if kind == "gemma2" else {}))
    keep = mask.bool()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        without = plain(input_ids=ids, attention_mask=mask).logits
        got = fnn.swap_modules(model)(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "fastattn"
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-4)
    assert (without[keep] - want[keep]).abs().max() > 1e-2


@needs_transformers
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_hf_sliding_window_decoding(kind, cache, kernels):
    """Prefill then single-token steps past the window with transformers' caches (a sliding cache's truncated
    keys; a static cache's fixed-length buffer): the logits of every step are eager's."""
    import transformers

    ids, mask = _hf_inputs(2, 14, padded=True, seed=1)
    prefill = 5
    logits = {}
    for impl in ("eager", "fastattn"):
        model = _hf_local_lm(kind)
        if impl == "fastattn":
            fnn.swap_modules(model)
        past = (transformers.DynamicCache(config=model.config) if cache == "dynamic"
                else transformers.StaticCache(config=model.config, max_cache_len=32))
        steps = []
        with torch.no_grad():
            for lo, hi in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
                out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], past_key_values=past,
                            use_cache=True)
                steps.append(out.logits[:, -1])
        logits[impl] = torch.stack(steps, 1)
    torch.testing.assert_close(logits["fastattn"], logits["eager"], atol=2e-5, rtol=1e-4)


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ["prefill", "decode", "mask-with-offsets"])
def test_hf_attention_forward_window_softcap(shape, dtype, monkeypatch):
    """fastattn's HF attention function with ``softcap`` and ``sliding_window`` against fastattn.reference given
    the mask transformers itself builds for that window (sliding_window_causal_mask_function at the positions the
    call implies), output and gradients under DESIGN.md §5. "mask-with-offsets": transformers passes the mask
    (queries at positions 7..9 of a 20-slot static cache) and the window: the mask alone decides."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    from fastattn import reference
    from fastattn.nn.hf import attention_forward
    from fastattn.testing import forward_backward

    Bz, H, Hkv, D, Lk, w, cap, scaling = 2, 4, 2, 16, 20, 5, 2.0, 0.3
    Lq, q_offset = {"prefill": (Lk, 0), "decode": (1, Lk - 1), "mask-with-offsets": (3, 7)}[shape]
    hf_mask = sdpa_mask(batch_size=Bz, q_length=Lq, kv_length=Lk, q_offset=q_offset,
                        mask_function=sliding_window_causal_mask_function(w), allow_is_causal_skip=False)
    assert not hf_mask.all(dim=-1).any() and hf_mask.any(dim=-1).all()  # the window cuts every row, empties none
    given = hf_mask.to(DEVICE) if shape == "mask-with-offsets" else None
    g = torch.Generator().manual_seed(3)
    inputs = {n: (torch.randn(Bz, h, L, D, generator=g) * 3).to(DEVICE).requires_grad_()  # scores of a few units
              for n, h, L in (("q", H, Lq), ("k", Hkv, Lk), ("v", Hkv, Lk))}
    grads = {"out": torch.randn(Bz, Lq, H, D, generator=g).to(DEVICE)}
    module = nn.Module()
    module.is_causal = True

    def fast(q, k, v):
        return {"out": attention_forward(module, q, k, v, given, scaling=scaling, softcap=cap, sliding_window=w)[0]}

    def ref(q, k, v):
        out = reference.attention(q, k, v, attn_mask=hf_mask.to(q.device), scale=scaling, softcap=cap)
        return {"out": out.transpose(1, 2)}

    with monkeypatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", KERNEL_BACKEND)
        got = forward_backward(fast, inputs, grads, dtype)
    ref64, low = forward_backward(ref, inputs, grads, torch.float64), forward_backward(ref, inputs, grads, dtype)
    assert_rule([compare(got[n], ref64[n], low[n], name=n, factor=BACKWARD_FACTOR if n.startswith("d") else
                         FORWARD_FACTOR) for n in ref64])
    # The cap and the window matter at these scores: without them the reference is far from the result.
    loose = reference.attention(*(inputs[n].detach().double() for n in "qkv"), scale=scaling,
                                causal=shape != "decode").transpose(1, 2)
    assert (loose - ref64["out"]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------- compile, demo
def test_compiled_module_matches_eager(kernels):
    torch.manual_seed(0)
    m = fnn.MultiheadAttention(E, HEADS, batch_first=True).to(DEVICE)
    x, kpm = _randn(B, LQ, E).to(DEVICE), _kpm(B, LQ).to(DEVICE)
    eager = m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    compiled = torch.compile(m, fullgraph=True)(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


def test_demo_runs():
    r = subprocess.run([sys.executable, "-m", "fastattn", "demo", "--steps", "6", "--size", "tiny"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fused" in r.stdout and "unfused" in r.stdout
