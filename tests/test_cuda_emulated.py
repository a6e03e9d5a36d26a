"""The CUDA C++ kernels (backend="cuda") on the CPU: csrc/ compiled by the host compiler against the CPU emulator
of csrc/emulate/ (fastattn._C_emu, FASTATTN_CUDA_EMULATE=1 set by conftest), checked against the float64
reference under DESIGN.md §5 like the Triton kernels. The emulator executes the kernels' own code (tiling, masks,
online softmax, the mma / ldmatrix fragment arithmetic, barriers, cp.async groups) one block at a time; at the end,
the same kernels under other thread orders and cp.async landing times must give the same bits (a race shows as a
difference), and no kernel may break a rule whose breach faults on the hardware (csrc/emulate/ raises those;
tests/test_emulator.py shows each check fires). Out-of-bounds accesses: the same tests under `make emu-memcheck`
(AddressSanitizer); timing: the GPU tests. fp16 and bf16 (fp32 also for the row kernels): the emulator, unlike
Triton's interpreter, runs bf16."""
import pytest
import torch

import fastattn
from fastattn import cuda
from fastattn.testing import (AttentionCase, LayerNormCase, SoftmaxCase, attention_problem, forward_backward,
                              layer_norm_problem, run_attention_case, run_layer_norm_case, run_softmax_case,
                              softmax_problem)

import conftest
from test_attention import MASKS, SHAPES, assert_bias_grad_allocates_no_score_sized_buffer
from test_dropout_varlen import VARLEN_CASES
from test_local_attention import LOCAL_HEAD_DIM_CASES, WINDOWS

# Skipped where the emulator is not built; never under `make emu-memcheck`, which must run them.
pytestmark = pytest.mark.skipif(cuda.why_unavailable("cpu") is not None and cuda.emulator_name() == "_C_emu",
                                reason=f"CUDA emulator: {cuda.why_unavailable('cpu')}")

HALF = [torch.float16, torch.bfloat16]


def assert_case(case, run=run_attention_case):
    conftest.assert_case(run, case, "cpu", "cuda")


# ------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_lengths(Lq, Lk, causal):
    assert_case(AttentionCase(Lq=Lq, Lk=Lk, D=32, dtype=torch.float16, causal=bool(causal),
                              alignment=causal or "top_left", seed=Lq * 1000 + Lk))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("D", [16, 32, 40, 64, 96, 111, 128, 256])
def test_head_dims(D, dtype):
    """Every kernel configuration (head dims 32 … 256; others zero-padded to the next one)."""
    assert_case(AttentionCase(B=1, H=2, Lq=40, Lk=150, D=D, dtype=dtype, causal=True, kv_lens=True, seed=D))


def test_several_blocks_each_way():
    """More query and key blocks than one CTA tile (the K/V double buffer and causal block skipping)."""
    assert_case(AttentionCase(B=1, H=2, Lq=300, Lk=333, D=64, dtype=torch.bfloat16, causal=True,
                              alignment="bottom_right", seed=3))


@pytest.mark.parametrize("Lq,Lk", [(70, 70), (40, 100), (100, 40)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks(mask, Lq, Lk):
    assert_case(AttentionCase(B=3, Lq=Lq, Lk=Lk, D=32, dtype=torch.float16, seed=hash(mask) % 1000 + Lq,
                              **MASKS[mask]))


@pytest.mark.parametrize("bias", ["full", "heads", "batch", "2d", "rows", "head"])
@pytest.mark.parametrize("grad", [False, True])
def test_bias(bias, grad):
    """Lq = 77: rows for every warp of a query tile (the dbias kernel sums over them) and a partial tile;
    bottom-right causal with Lq > Lk: some rows see no key."""
    assert_case(AttentionCase(B=2, H=2, Lq=77, Lk=70, D=32, dtype=torch.float16, bias=bias, bias_grad=grad,
                              causal=grad, alignment="bottom_right", seed=len(bias) + grad))


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (6, 3)])
def test_gqa(H, Hkv):
    assert_case(AttentionCase(B=2, H=H, Hkv=Hkv, Lq=50, Lk=70, D=64, dtype=torch.bfloat16, kv_lens=True,
                              causal=True, seed=H * Hkv))


def test_broadcast_bias_grad_allocates_no_score_sized_buffer(monkeypatch):
    assert_bias_grad_allocates_no_score_sized_buffer(monkeypatch, "cpu", "cuda", torch.float16)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lse_gradient(dtype):
    assert_case(AttentionCase(Lq=50, Lk=40, D=32, dtype=dtype, lse_grad=True, kv_lens=True, bias="heads",
                              bias_grad=True))


@pytest.mark.parametrize("scale", [10.0, 30.0])
def test_large_logits(scale):
    assert_case(AttentionCase(Lq=50, Lk=60, D=32, dtype=torch.float16, logit_scale=scale, causal=True,
                              seed=int(scale)))


# ------------------------------------------------------------------------------------------- dropout, varlen
@pytest.mark.parametrize("extra", [
    dict(),
    dict(causal=True, Lq=40, Lk=23, alignment="bottom_right", kv_lens=True),
    dict(Hkv=1, H=4, bias="full", bias_grad=True, lse_grad=True),
    dict(Hkv=1, H=4, bias="batch", bias_grad=True, causal=True),
    dict(key_padding=True, window=(5, 2), softcap=3.0, D=40),
], ids=["plain", "causal-br-kvlens", "gqa-bias-lse", "gqa-broadcast-bias", "padding-window-softcap"])
def test_dropout(extra):
    """The reference replays the keep-mask of return_dropout_mask (drawn by the Triton kernel's rule): a pass
    shows that the CUDA kernels drew the same Philox mask."""
    kw = dict(B=2, H=2, Lq=33, Lk=47, D=32, dtype=torch.float16, dropout=0.25, seed=11)
    assert_case(AttentionCase(**{**kw, **extra}))


VARLEN = {**VARLEN_CASES, "mqa-d256": dict(varlen=((65, 150), (30, 30), (5, 0)), H=4, Hkv=1, D=256, causal=True,
                                           alignment="bottom_right")}


@pytest.mark.parametrize("extra", list(VARLEN.values()), ids=list(VARLEN))
def test_varlen(extra):
    assert_case(AttentionCase(**{**dict(D=32, dtype=torch.bfloat16, seed=7), **extra}))


# ------------------------------------------------------------------------------------------- local, ALiBi, softcap
@pytest.mark.parametrize("Lq,Lk", [(70, 70), (40, 100), (100, 40)])
@pytest.mark.parametrize("name", list(WINDOWS))
def test_window(name, Lq, Lk):
    assert_case(AttentionCase(Lq=Lq, Lk=Lk, D=32, dtype=torch.float16, seed=Lq + Lk, **WINDOWS[name]))


@pytest.mark.parametrize("extra", [dict(causal=True), dict(causal=True, alignment="bottom_right", Lq=40),
                                   dict(window=(8, 8), Lq=100, Lk=40, alignment="bottom_right")],
                         ids=["causal", "causal-br", "window-br"])
@pytest.mark.parametrize("alibi", ["heads", "batch"])
def test_alibi(alibi, extra):
    assert_case(AttentionCase(**{**dict(Lq=70, Lk=70, H=4, Hkv=2, D=32, dtype=torch.float16, alibi=alibi, seed=3),
                                 **extra}))


@pytest.mark.parametrize("cap,logit_scale", [(0.5, 1.0), (5.0, 6.0), (30.0, 1.0)])
def test_softcap(cap, logit_scale):
    assert_case(AttentionCase(Lq=50, Lk=80, D=32, dtype=torch.float16, softcap=cap, logit_scale=logit_scale,
                              causal=True, bias="heads", bias_grad=True, seed=1))


# The features that change the kernels' code paths, per head-dim configuration (test_gpu_local_head_dims, shorter).
@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("extra", list(LOCAL_HEAD_DIM_CASES.values()), ids=list(LOCAL_HEAD_DIM_CASES))
def test_local_head_dims(extra, D):
    extra = {**extra, "Lq": extra["Lq"] // 3, "Lk": extra["Lk"] // 3}
    assert_case(AttentionCase(B=2, H=4, Hkv=2, D=D, dtype=torch.bfloat16, seed=D, **extra))


# ------------------------------------------------------------------------------------------- softmax, LayerNorm
ROW_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 3, 127, 768, 1000, 4096, 40000])
def test_softmax_widths(N, dtype):
    """A warp per row, a block per row, and (40000) rows wider than the team's registers."""
    assert_case(SoftmaxCase(shape=(3, N), dtype=dtype, scale=0.3, mask="row", mask_grad=True, seed=N),
                run_softmax_case)


@pytest.mark.parametrize("mask", ["full", "lead"])
def test_softmax_mask_broadcast(mask):
    assert_case(SoftmaxCase(shape=(2, 3, 5, 70), dtype=torch.float16, scale=0.125, mask=mask, mask_grad=True),
                run_softmax_case)


def test_softmax_unaligned_rows():
    """Rows and a mask off a 16-byte boundary: element loads instead of vector loads."""
    N = 1001
    x = torch.randn(4 * N + 1, dtype=torch.float16)[1:].view(4, N)
    mask = torch.randn(N + 3)[3:]
    y = fastattn.softmax(x, mask=mask, backend="cuda")
    torch.testing.assert_close(y.double(), fastattn.reference.softmax(x.double(), mask=mask.double()),
                               atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 3, 127, 768, 1000, 4096, 40000])
def test_layer_norm_widths(N, dtype):
    assert_case(LayerNormCase(shape=(5, N), dtype=dtype, residual=True, prenorm=True, seed=N), run_layer_norm_case)


@pytest.mark.parametrize("kw", [dict(weight=False, bias=False), dict(bias=False), dict(weight=False)])
def test_layer_norm_variants(kw):
    assert_case(LayerNormCase(shape=(6, 300), dtype=torch.bfloat16, **kw), run_layer_norm_case)


def test_layer_norm_unaligned_rows_mixed_dtypes_and_many_rows():
    """fp16 rows off a 16-byte boundary with fp32 weight and bias, more rows than backward blocks."""
    R, N = 40, 1000
    x = torch.randn(R * N + 1, dtype=torch.float16)[1:].view(R, N).requires_grad_()
    w, b = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)
    y = fastattn.layer_norm(x, N, w, b, backend="cuda")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.layer_norm(xd, (N,), wd, bd)
    want = torch.autograd.grad(ref, (xd, wd, bd), dy.double())
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=5e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------- races
# Every schedule the hardware may pick must give the same bits (the kernels are deterministic): a kernel that reads
# shared memory another thread writes without a barrier between, or a cp.async stage before its wait_group, or
# that refills a stage other warps still read, gives different results under another thread order or landing time.
SCHEDULES = [("forward", "lazy", 0), ("reverse", "lazy", 0), ("shuffle", "eager", 1), ("first-ahead", "eager", 0),
             ("first-ahead", "lazy", 0), ("last-ahead", "eager", 0), ("last-ahead", "lazy", 0)]
RACE_CASES = {
    "attn-d64-causal-kvlens-bias": (attention_problem, AttentionCase(
        B=2, H=2, Lq=150, Lk=333, D=64, dtype=torch.float16, causal=True, alignment="bottom_right", kv_lens=True,
        bias="heads", bias_grad=True, lse_grad=True, seed=5)),
    "attn-d128-gqa-dropout-bias": (attention_problem, AttentionCase(
        B=1, H=4, Hkv=2, Lq=70, Lk=200, D=128, dtype=torch.bfloat16, dropout=0.2, bias="batch", bias_grad=True,
        seed=6)),
    "attn-d256-window-alibi-bias": (attention_problem, AttentionCase(
        B=1, H=2, Lq=90, Lk=130, D=256, dtype=torch.bfloat16, window=(40, 10), alibi="heads", softcap=20.0,
        bias="head", bias_grad=True, seed=7)),
    "attn-d32-varlen": (attention_problem, AttentionCase(
        H=4, Hkv=1, D=32, dtype=torch.float16, varlen=((65, 150), (30, 30), (5, 0)), causal=True, seed=8)),
    **{f"softmax-{n}": (softmax_problem, SoftmaxCase(shape=(3, n), dtype=torch.float16, mask="row", mask_grad=True,
                                                     seed=n)) for n in (768, 4096, 40000)},
    **{f"layer-norm-{n}": (layer_norm_problem, LayerNormCase(shape=(5, n), dtype=torch.bfloat16, residual=True,
                                                             prenorm=True, seed=n)) for n in (768, 4096, 40000)},
}


def outputs_under(schedule, problem, case):
    emu = cuda.extension(torch.empty(0))
    emu.set_schedule(*schedule)
    try:
        fn, inputs, grad_outputs = problem(case)
        res = forward_backward(lambda **kw: fn(backend="cuda", **kw), inputs, grad_outputs, case.dtype)
    finally:
        emu.set_schedule()
    return res


@pytest.mark.parametrize("name", list(RACE_CASES))
def test_same_bits_under_every_schedule(name):
    problem, case = RACE_CASES[name]
    want = outputs_under(("forward", "eager", 0), problem, case)
    for schedule in SCHEDULES:
        got = outputs_under(schedule, problem, case)
        for key, w in want.items():
            assert torch.equal(got[key], w), f"{key} differs under schedule {schedule}: a race (csrc/emulate/)"


def test_set_schedule_names_the_bad_argument():
    emu = cuda.extension(torch.empty(0))
    with pytest.raises(ValueError, match="order"):
        emu.set_schedule("backward")
    with pytest.raises(ValueError, match="cp_async"):
        emu.set_schedule("forward", "soon")
