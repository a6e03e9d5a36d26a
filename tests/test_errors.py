"""Bad input gets a ValueError / TypeError naming the argument; empty problems return empty results."""
import os

import pytest
import torch

import fastattn
from fastattn.testing import random_qkv

from conftest import DEVICE


def qkv(B=2, H=2, Lq=8, Lk=8, D=16, **kw):
    return random_qkv(B, H, Lq, Lk, D, device=DEVICE, **kw)


def call(q, k, v, **kw):
    return fastattn.attention(q, k, v, backend="triton", **kw)


@pytest.mark.parametrize("make,exc,words", [
    (lambda q, k, v: (q.half() if q.dtype != torch.float16 else q.float(), k, v), TypeError, "dtype"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q, k[:, :, :5], v), ValueError, "k"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "batch"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "head dim"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q must be a floating-point"),
    (lambda q, k, v: (q, "k", v), TypeError, "k must be a torch.Tensor"),
])
def test_bad_qkv(make, exc, words):
    q, k, v = make(*qkv(requires_grad=False))
    with pytest.raises(exc, match=words):
        call(q, k, v)


def test_head_dim_too_large():
    with pytest.raises(ValueError, match="head dim 320"):
        call(*qkv(D=320, requires_grad=False))


def test_empty_softmax_and_layer_norm_are_empty_as_in_torch(kernel_backend):
    """No rows (or an empty normalized dim): the result is empty, as torch's, with empty gradients; no kernel."""
    for shape in ((0, 4), (3, 0), (2, 0, 5)):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        for got, want in ((fastattn.softmax(x, backend=kernel_backend), torch.softmax(x, -1)),
                          (fastattn.layer_norm(x, shape[-1:], backend=kernel_backend),
                           torch.nn.functional.layer_norm(x, shape[-1:])),
                          (fastattn.add_layer_norm(x, x, shape[-1:], backend=kernel_backend),
                           torch.nn.functional.layer_norm(x + x, shape[-1:]))):
            assert got.shape == want.shape and got.dtype == want.dtype
            got.sum().backward()
            assert x.grad.shape == x.shape


def test_grid_limits(monkeypatch):
    """Heads and batch go on the Triton grid's second and third axes, at most 65535 each on CUDA (not their
    product): past that a clear error, not a failed launch. The dbias slots and the dropout-mask slices, (b, h)
    pairs on one axis, launch in chunks of that many: same bits. (The limit is shrunk here: the interpreter has
    none, and 65536 programs would take it minutes.)"""
    from fastattn.triton import attention as kernels
    q, k, v = qkv(B=2, H=3, Lq=5, Lk=7)
    bias = torch.randn(2, 3, 1, 7, device=DEVICE, requires_grad=True)

    def run():
        out, keep = call(q, k, v, attn_bias=bias, dropout_p=0.3, return_dropout_mask=True)
        return (out, keep, *torch.autograd.grad(out.sum(), (q, bias)))

    torch.manual_seed(0)
    want = run()
    monkeypatch.setattr(kernels, "MAX_GRID_YZ", 4)  # 6 (b, h) pairs: two launches of each chunked kernel
    torch.manual_seed(0)
    for got, ref in zip(run(), want):
        assert torch.equal(got, ref)
    monkeypatch.setattr(kernels, "MAX_GRID_YZ", 2)
    with pytest.raises(ValueError, match="batch 2 and heads 3: the Triton attention kernels take at most 2"):
        call(q, k, v)


def test_heads_not_divisible():
    q, k, v = qkv(H=6, requires_grad=False)
    with pytest.raises(ValueError, match="multiple of k/v's 4 heads"):
        call(q, k[:, :4], v[:, :4])


def test_devices_differ():
    q, k, v = qkv(requires_grad=False)
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match="k is on meta"):
        call(q, meta, v)


def test_float64_on_kernels():
    q, k, v = (t.double() for t in qkv(requires_grad=False))
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        call(q, k, v)
    assert fastattn.attention(q, k, v, backend="torch").dtype == torch.float64


def test_automatic_choice_falls_back_to_torch_where_the_kernels_cannot_run(monkeypatch):
    """backend="auto" (here with FASTATTN_BACKEND=triton, as on a GPU) runs what the kernels refuse on torch's
    backend, as SDPA takes its math path: float64 and head dims over 256, through the ops and the nn modules."""
    import fastattn.nn
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    q, k, v = (t.double() for t in qkv(requires_grad=False))
    wide = qkv(D=320, requires_grad=False)
    for args in ((q, k, v), wide):
        torch.testing.assert_close(fastattn.attention(*args), fastattn.attention(*args, backend="torch"))
    x = q[0, 0]
    torch.testing.assert_close(fastattn.layer_norm(x, (16,)), torch.nn.functional.layer_norm(x, (16,)))
    torch.testing.assert_close(fastattn.softmax(x), torch.softmax(x, -1))
    mha, ref = fastattn.nn.MultiheadAttention(640, 2, batch_first=True), torch.nn.MultiheadAttention(
        640, 2, batch_first=True)
    mha.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 640, device=DEVICE)
    torch.testing.assert_close(mha.to(DEVICE)(x, x, x, need_weights=False)[0],
                               ref.to(DEVICE)(x, x, x, need_weights=False)[0])


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter only runs on CPU")
def test_bf16_under_interpreter_is_refused():
    q, k, v = (t.bfloat16() for t in qkv(requires_grad=False))
    with pytest.raises(TypeError, match="bfloat16 is not supported by the Triton interpreter"):
        call(q, k, v)


@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (2, 3, 8, 8), (8, 7), (2, 2, 2, 8, 8)])
def test_bias_does_not_broadcast(shape):
    with pytest.raises(ValueError, match="attn_bias"):
        call(*qkv(requires_grad=False), attn_bias=torch.randn(shape, device=DEVICE))


def test_bias_bad_dtype():
    with pytest.raises(TypeError, match="attn_bias"):
        call(*qkv(requires_grad=False), attn_bias=torch.ones(8, 8, dtype=torch.int32, device=DEVICE))


def test_key_padding_mask_checks():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        call(q, k, v, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        call(q, k, v, key_padding_mask=torch.zeros(2, 8, device=DEVICE))


@pytest.mark.parametrize("lens,exc,words", [
    ([9, 3], ValueError, r"kv_lens must lie in \[0, Lk=8\]"),
    ([-1, 3], ValueError, "kv_lens must lie"),
    ([3], ValueError, "kv_lens must have shape"),
])
def test_kv_lens_checks(lens, exc, words):
    with pytest.raises(exc, match=words):
        call(*qkv(requires_grad=False), kv_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def test_kv_lens_dtype():
    with pytest.raises(TypeError, match="kv_lens"):
        call(*qkv(requires_grad=False), kv_lens=torch.tensor([3.0, 4.0], device=DEVICE))


def test_bad_options():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(ValueError, match="causal_alignment"):
        call(q, k, v, causal=True, causal_alignment="center")
    with pytest.raises(ValueError, match="dropout_p"):
        call(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="backend must be"):
        fastattn.attention(q, k, v, backend="tpu")
    with pytest.raises(ValueError, match="dropout_p must be a float"):
        call(q, k, v, dropout_p=True)
    for bad in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="scale must be a finite float"):
            call(q, k, v, scale=bad)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        call(q, k, v, key_padding_mask=[[False] * 8] * 2)
    with pytest.raises(ValueError, match="head dim of q, k and v must be >= 1"):
        call(q[..., :0], k[..., :0], v[..., :0])
    with pytest.raises(ValueError, match="at least one head"):
        call(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="num_heads must be an int"):
        fastattn.alibi_slopes(2.0)
    call(q, k, v, deterministic=False)  # FlashAttention's flag: accepted, every backward is deterministic


def test_sdpa_errors():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(ValueError, match="is_causal"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    k3, v3 = (torch.cat([t, t[:, :1]], 1) for t in (k, v))  # 3 heads against the query's 2: no broadcast
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k3, v3)
    with pytest.raises(ValueError, match="query must be"):
        fastattn.scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(ValueError, match="leading dims"):
        fastattn.scaled_dot_product_attention(q[None].expand(3, -1, -1, -1, -1), k[None].expand(2, -1, -1, -1, -1),
                                              v[None])
    # attn_mask is named as SDPA's caller knows it (attention() calls it attn_bias), also in 5-D
    for mask in ([[True]], torch.ones(8, 8, dtype=torch.int32)):
        for d in (4, 5):
            with pytest.raises(TypeError, match="attn_mask must be a bool"):
                fastattn.scaled_dot_product_attention(*(t.view((1,) * (d - 4) + t.shape) for t in (q, k, v)),
                                                      attn_mask=mask)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 8, 8\) does not broadcast"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_mask must be a bool tensor"):
        fastattn.attention(q, k, v, dropout_p=0.5, dropout_mask=[[True]], backend="torch")


def test_backend_variable_cuda_falls_back_to_torch_for_fp32_attention(monkeypatch):
    """FASTATTN_BACKEND=cuda steers the automatic choice: fp32 attention, which the CUDA kernels (fp16/bf16 MMAs)
    do not take, runs on "torch" as dispatch.select promises, instead of raising."""
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    q, k, v = qkv(requires_grad=False)
    q, k, v = q.float(), k.float(), v.float()
    torch.testing.assert_close(fastattn.attention(q, k, v, causal=True),
                               fastattn.attention(q, k, v, causal=True, backend="torch"))
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,Lq,Lk", [(0, 8, 8), (2, 0, 8), (2, 8, 0)])
def test_empty_problems(B, Lq, Lk):
    """B = 0 or Lq = 0 give empty outputs; Lk = 0 leaves every row without keys: zeros. Gradients flow."""
    q, k, v = qkv(B=B, Lq=Lq, Lk=Lk)
    out = call(q, k, v, causal=True)
    assert out.shape == (B, 2, Lq, 16)
    assert (out == 0).all()
    if out.numel():
        dq, = torch.autograd.grad(out.sum(), (q,))
        assert (dq == 0).all()


def test_cpu_triton_needs_interpreter(monkeypatch):
    from fastattn import dispatch
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.select("triton", torch.empty(1))
    with monkeypatch.context() as m:  # the CUDA kernels on CPU tensors only under the emulator
        m.delenv("FASTATTN_CUDA_EMULATE", raising=False)
        with pytest.raises(RuntimeError, match="CUDA C\\+\\+ extension.*FASTATTN_CUDA_EMULATE=1"):
            dispatch.select("cuda", torch.empty(1))
    assert dispatch.select("auto", torch.empty(1)) == "torch"
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    assert dispatch.select("auto", torch.empty(1)) == "torch"


def test_forward_mode_ad_never_meets_the_kernels(monkeypatch):
    """torch.library custom ops drop tangents silently (a zero JVP): under torch.func.jvp or with
    torch.autograd.forward_ad dual tensors the automatic choice runs backend "torch", whose JVP is right, and an
    explicit kernel backend raises instead of answering 0."""
    import torch.autograd.forward_ad as fwAD
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    q, k, v, tq = (torch.randn(1, 2, 6, 8, generator=g).to(DEVICE) for _ in range(4))
    x, tx = (torch.randn(3, 16, generator=g).to(DEVICE) for _ in range(2))
    sinks, ts = (torch.randn(2, generator=g).to(DEVICE) for _ in range(2))
    ops = {"attention": (lambda q, backend="auto": fastattn.attention(q, k, v, causal=True, backend=backend), q, tq),
           "attention sinks": (lambda s, backend="auto": fastattn.attention(q, k, v, causal=True, sinks=s,
                                                                             backend=backend), sinks, ts),
           "attention alibi": (lambda a, backend="auto": fastattn.attention(q, k, v, causal=True, alibi_slopes=a,
                                                                            backend=backend), sinks.abs(), ts),
           "softmax": (lambda x, backend="auto": fastattn.softmax(x, -1, backend=backend), x, tx),
           "layer_norm": (lambda x, backend="auto": fastattn.layer_norm(x, 16, backend=backend), x, tx)}
    for name, (fn, primal, tangent) in ops.items():
        want = torch.func.jvp(lambda t: fn(t, "torch"), (primal,), (tangent,))[1]
        got = torch.func.jvp(fn, (primal,), (tangent,))[1]
        assert want.abs().max() > 0.1, name
        torch.testing.assert_close(got, want, msg=name)
        with fwAD.dual_level():
            dual = fwAD.make_dual(primal, tangent)
            torch.testing.assert_close(fwAD.unpack_dual(fn(dual)).tangent, want, msg=name)
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                fn(dual, "triton")
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jvp(lambda t: fn(t, "triton"), (primal,), (tangent,))


def test_import_leaves_triton_for_later():
    """`import fastattn` imports neither triton nor torch._dynamo (which imports triton): `python -m fastattn check`
    sets TRITON_INTERPRET after the package is imported, and a triton imported before that runs no kernel on the
    CPU (`make check` once failed every Triton row so). The mark that replaces torch.compiler's decorator is still
    what that decorator sets."""
    import subprocess
    import sys
    code = "import sys, fastattn; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
    assert getattr(torch.compiler.assume_constant_result(lambda: 0), "_dynamo_marked_constant", False)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_policy_is_torchs(monkeypatch, compiled):
    """Under torch.autocast on CUDA (here the CPU, told to follow CUDA's policy) the ops do what torch's do:
    LayerNorm and softmax in fp32 (softmax's explicit dtype kept; add_layer_norm's sum in x's dtype), attention
    in the autocast dtype, as SDPA; float64 left alone."""
    from fastattn.ops import common
    monkeypatch.setattr(common, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 16, generator=g).bfloat16() for _ in range(2))
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))

    def ops(x, r, q, k, v):
        y, s = fastattn.add_layer_norm(x, r, 16, prenorm=True)
        return (fastattn.layer_norm(x, 16), fastattn.softmax(x), fastattn.softmax(x, dtype=torch.bfloat16), y, s,
                fastattn.attention(q, k, v, causal=True), fastattn.attention(q.double(), k.double(), v.double()))
    fn = torch.compile(ops, backend="aot_eager", fullgraph=True) if compiled else ops
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ln, sm, sm16, y, s, att, att64 = fn(x, r, q, k, v)
        want = fastattn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert [t.dtype for t in (ln, sm, sm16, y, s, att, att64)] == [
        torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float64]
    torch.testing.assert_close(ln, torch.nn.functional.layer_norm(x.float(), (16,)))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm((x + r).float(), (16,)))
    torch.testing.assert_close(att, want)


@pytest.mark.gpu
def test_gpu_autocast_matches_torch():
    """Under torch.autocast on a GPU: LayerNorm and softmax return fp32 and SDPA the autocast dtype, as torch's."""
    import fastattn.nn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=g).cuda().half()
    q, k, v = (torch.randn(2, 4, 33, 64, generator=g).cuda() for _ in range(3))
    ln, ref_ln = fastattn.nn.LayerNorm(64).cuda(), torch.nn.LayerNorm(64).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        pairs = [(ln(x), ref_ln(x)), (fastattn.softmax(x), torch.softmax(x, -1)),
                 (fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                  torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))]
    for got, want in pairs:
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
