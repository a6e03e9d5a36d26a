"""LayerNorm / add + LayerNorm kernels (Triton; the `gpu` tests also CUDA C++)
against the float64 reference under DESIGN.md §5, the nn drop-in."""
import pytest
import torch

import fastattn
import fastattn.nn
from fastattn import reference
from fastattn.testing import LayerNormCase, run_layer_norm_case

import conftest
from conftest import DEVICE

DTYPES = [torch.float16, torch.float32]


def assert_case(case, device=DEVICE, backend="triton"):
    conftest.assert_case(run_layer_norm_case, case, device, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 3, 127, 768, 1000, 4096, 40000])
@pytest.mark.parametrize("residual", [False, True])
def test_widths(N, residual, dtype):
    """40000 takes the looped path (three passes forward, two backward, partial dw/db in memory)."""
    assert_case(LayerNormCase(shape=(20, N) if N < 4096 else (3, N), dtype=dtype, residual=residual,
                              prenorm=residual, seed=N))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [dict(weight=False, bias=False), dict(bias=False), dict(weight=False),
                                dict(shape=(3, 4, 5, 6), norm_dims=2), dict(shape=(2, 3, 40), norm_dims=3),
                                dict(offset=300.0), dict(eps=1e-2), dict(residual=True, prenorm=False)])
def test_variants(kw, dtype):
    assert_case(LayerNormCase(dtype=dtype, **{"shape": (9, 96), **kw}))


def test_strided_weight_and_bias(device):
    """Parameters that are views with a stride (e.g. slices of a packed buffer) are read correctly."""
    x = torch.randn(5, 32, device=device)
    packed = torch.randn(64, device=device)
    w, b = packed[::2], packed[1::2]  # stride 2
    assert w.stride() == (2,) and b.stride() == (2,)
    torch.testing.assert_close(fastattn.layer_norm(x, 32, w, b, backend="triton"),
                               torch.nn.functional.layer_norm(x, (32,), w, b), rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(device):
    """Many more rows than backward programs: dw/db partial sums are reduced in a fixed order."""
    x = torch.randn(500, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    dy = torch.randn(500, 64, device=device)
    runs = [torch.autograd.grad(fastattn.layer_norm(x, 64, w, b, backend="triton"), (x, w, b), dy) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("residual", [False, True])
def test_double_backward_as_torch(kernel_backend, residual):
    """create_graph=True (a gradient penalty): the gradients differentiate again, as torch.nn.LayerNorm's do
    (the kernels' backward once raised "no autograd formula" there); the first gradients are unchanged."""
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(6, 48, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    w, b = (torch.randn(48, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    dy = torch.randn(6, 48, generator=g).to(DEVICE)

    def penalty(fn):
        y = fn()
        gx, gw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum() + (gw ** 3).sum(), (x, r, w, b) if residual else (x, w, b),
                                   allow_unused=True)
    if residual:
        got = penalty(lambda: fastattn.add_layer_norm(x, r, 48, w, b, backend=kernel_backend))
        want = penalty(lambda: torch.nn.functional.layer_norm(x + r, (48,), w, b))
    else:
        got = penalty(lambda: fastattn.layer_norm(x, 48, w, b, backend=kernel_backend))
        want = penalty(lambda: torch.nn.functional.layer_norm(x, (48,), w, b))
    for a, c, t in zip(got, want, (x, r, w, b) if residual else (x, w, b)):  # unused: None or zeros
        torch.testing.assert_close(*(torch.zeros_like(t) if z is None else z for z in (a, c)), rtol=1e-4, atol=1e-4)


def test_add_layer_norm_promotes_mixed_dtypes_as_the_sum_does():
    """An fp16/bf16 sublayer output meets an fp32 residual stream under autocast: promoted as x + residual is,
    then normalised (it once raised a dtype mismatch where torch's layers run)."""
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(3, 32, generator=g).to(DEVICE).bfloat16(), torch.randn(3, 32, generator=g).to(DEVICE)
    y, s = fastattn.add_layer_norm(x, r, 32, prenorm=True)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (32,)))


def test_reference_is_torch_layer_norm():
    x, w, b = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64), \
        torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, (5, 6), w, b, 1e-3),
                               torch.nn.functional.layer_norm(x, (5, 6), w, b, 1e-3))
    torch.testing.assert_close(fastattn.layer_norm(x, [5, 6], w, b, 1e-3),
                               torch.nn.functional.layer_norm(x, (5, 6), w, b, 1e-3))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf − inf under the interpreter
def test_nan_inf_propagate_like_torch(device):
    x = torch.randn(4, 32, device=device)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    y = fastattn.layer_norm(x, 32, backend="triton")
    want = torch.nn.functional.layer_norm(x.cpu(), (32,))
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(want))
    torch.testing.assert_close(y[[0, 3]].cpu(), want[[0, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-3)])
def test_nn_layer_norm_drop_in(kwargs, device):
    torch_ln = torch.nn.LayerNorm(48, **kwargs).to(device)
    with torch.no_grad():
        for p in torch_ln.parameters():
            p.normal_()
    ours = fastattn.nn.LayerNorm(48, **kwargs).to(device)
    ours.load_state_dict(torch_ln.state_dict())
    torch_ln.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.LayerNorm)
    assert list(ours.state_dict()) == list(torch_ln.state_dict())
    x = torch.randn(3, 7, 48, device=device)
    torch.testing.assert_close(ours(x), torch_ln(x), rtol=1e-5, atol=1e-5)
    r = torch.randn_like(x)
    y, s = ours(x, r, prenorm=True)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch_ln(x + r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_torch_backend_is_torch_layer_norm_bit_for_bit(dtype):
    """Backend "torch" (the CPU's "auto") runs torch's own kernels: fastattn.nn.LayerNorm is torch.nn.LayerNorm
    bit for bit, forward and backward; add_layer_norm is F.layer_norm of the sum rounded to x's dtype."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 7, 96, generator=g) * 3 + 1).to(dtype)
    ours, theirs = fastattn.nn.LayerNorm(96, dtype=dtype), torch.nn.LayerNorm(96, dtype=dtype)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.randn(96, generator=torch.Generator().manual_seed(2)))
            m.bias.copy_(torch.randn(96, generator=torch.Generator().manual_seed(3)))
    dy = torch.randn(x.shape, generator=g).to(dtype)
    results = []
    for m in (ours, theirs):
        xl = x.clone().requires_grad_()
        y = m(xl)
        results.append((y, *torch.autograd.grad(y, (xl, m.weight, m.bias), dy)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    r = torch.randn(x.shape, generator=g).to(dtype)
    y, s = fastattn.add_layer_norm(x, r, 96, ours.weight, ours.bias, prenorm=True, backend="torch")
    assert torch.equal(s, x + r) and torch.equal(y, torch.nn.functional.layer_norm(x + r, (96,), ours.weight, ours.bias))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: fastattn.layer_norm(torch.ones(3, 4), 5), ValueError, "normalized_shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4), 4, torch.ones(5)), ValueError, "weight has shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4), 4, None, torch.ones(3)), ValueError, "bias has shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4, dtype=torch.int32), 4), TypeError, "floating-point"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4), "4"), TypeError, "normalized_shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4), None), TypeError, "normalized_shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4), ["4"]), TypeError, "normalized_shape"),  # as torch
    (lambda: fastattn.layer_norm(torch.ones(3, 4), [4.0]), TypeError, "normalized_shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 1), [True]), TypeError, "normalized_shape"),
    (lambda: fastattn.layer_norm(torch.ones(3, 4), 4, eps=-1e-5), ValueError, "eps"),  # torch: NaN
    (lambda: fastattn.add_layer_norm(torch.ones(3, 4), torch.ones(3, 4), 4, eps=float("nan")), ValueError, "eps"),
    (lambda: fastattn.add_layer_norm(torch.ones(3, 4), torch.ones(2, 4), 4), ValueError, "residual"),
    (lambda: fastattn.add_layer_norm(torch.ones(3, 4), torch.ones(3, 4, dtype=torch.int32), 4), TypeError,
     "residual"),  # floating dtypes that differ are promoted, as x + residual promotes them
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_torch_compile_and_opcheck(device):
    x = torch.randn(6, 40, device=device, requires_grad=True)
    r = torch.randn(6, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)

    def f(x, r, w, b):
        y, s = fastattn.add_layer_norm(x, r, 40, w, b, prenorm=True, backend="triton")
        return y * 2 + s

    out = torch.compile(f, fullgraph=True)(x, r, w, b)
    assert torch.equal(out, f(x, r, w, b))
    torch.library.opcheck(torch.ops.fastattn.layer_norm_fwd.default, (x, r, w, b, 1e-5, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # the raw op on a strided x (the public function passes rows densely): read as it is, fakes agree
    xt = torch.randn(40, 6, device=device).t()
    torch.library.opcheck(torch.ops.fastattn.layer_norm_fwd.default, (xt, None, w, b, 1e-5, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
    y = torch.ops.fastattn.layer_norm_fwd(xt, None, None, None, 1e-5, "triton")[0]
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(xt, (40,)))
    # ... and its gradients (the saved strided x is read densely by the backward) and strided weight / bias
    xt.requires_grad_()
    wt, bt = (torch.randn(40, 2, device=device)[:, 0].requires_grad_() for _ in range(2))
    got = torch.autograd.grad(torch.ops.fastattn.layer_norm_fwd(xt, None, wt, bt, 1e-5, "triton")[0], (xt, wt, bt),
                              torch.ones(6, 40, device=device) + xt.detach())
    want = torch.autograd.grad(torch.nn.functional.layer_norm(xt, (40,), wt, bt), (xt, wt, bt),
                               torch.ones(6, 40, device=device) + xt.detach())
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    # the backward op without dweight/dbias in fp16: its placeholders have the fake's dtype
    xh, dy = (torch.randn(6, 40, device=device).half() for _ in range(2))
    _, _, mean, rstd = torch.ops.fastattn.layer_norm_fwd(xh, None, None, None, 1e-5, "triton")
    torch.library.opcheck(torch.ops.fastattn.layer_norm_bwd.default, (dy, None, xh, None, mean, rstd, False, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("N", [1, 3, 127, 768, 1000, 4096, 8192, 32768, 65536])
def test_gpu_widths(N, dtype, gpu_backend):
    assert_case(LayerNormCase(shape=(512, N) if N <= 8192 else (16, N), dtype=dtype, residual=True, prenorm=True,
                              seed=N), "cuda", gpu_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [7, 1000, 20000])
def test_gpu_unaligned_rows_and_mixed_dtypes(N, gpu_backend):
    """fp16 rows off a 16-byte boundary with fp32 weight and bias (vector loads fall back to element loads)."""
    x = torch.randn(6 * N + 1, device="cuda", dtype=torch.float16)[1:].view(6, N)
    r = torch.randn(6 * N + 3, device="cuda", dtype=torch.float16)[3:].view(6, N)
    w, b = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    y, s = fastattn.add_layer_norm(x, r, N, w, b, prenorm=True, backend=gpu_backend)
    torch.testing.assert_close(s, x + r)
    ref = torch.nn.functional.layer_norm((x + r).double(), (N,), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [64, 1000, 30000])
def test_gpu_backward_is_deterministic(N, gpu_backend):
    """Many more rows than backward blocks: dw/db partial sums are reduced in a fixed order, bitwise equal."""
    R = 4000 if N <= 1000 else 200
    x = torch.randn(R, N, device="cuda", dtype=torch.float16, requires_grad=True)
    w = torch.randn(N, device="cuda", requires_grad=True)
    b = torch.randn(N, device="cuda", requires_grad=True)
    dy = torch.randn(R, N, device="cuda", dtype=torch.float16)
    runs = [torch.autograd.grad(fastattn.layer_norm(x, N, w, b, backend=gpu_backend), (x, w, b), dy)
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)
