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
from fastattn.cuda import attention as cuda_attention
from fastattn.testing import (AttentionCase, LayerNormCase, SoftmaxCase, attention_problem, forward_backward,
                              layer_norm_problem, run_attention_case, run_layer_norm_case, run_softmax_case,
                              softmax_problem)

import conftest
from fastattn.triton.attention import forced_pack_gqa, forced_splits
from test_attention import MASKS, SHAPES, SPLIT_CASES, assert_bias_grad_allocates_no_score_sized_buffer
from test_dropout_varlen import VARLEN_CASES
from test_local_attention import LOCAL_HEAD_DIM_CASES, SINK_CASES, WINDOWS

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
    """The reference replays the keep-mask of return_dropout_mask (drawn by the CUDA backend's mask kernel): a
    pass shows that the attention kernels drew the same Philox mask."""
    kw = dict(B=2, H=2, Lq=33, Lk=47, D=32, dtype=torch.float16, dropout=0.25, seed=11)
    assert_case(AttentionCase(**{**kw, **extra}))


@pytest.mark.parametrize("B,H,Lq,Lk,p", [(2, 3, 37, 45, 0.3), (1, 1, 1, 1, 0.5), (3, 2, 100, 130, 0.9)])
def test_dropout_mask_kernel_is_the_triton_mask(B, H, Lq, Lk, p):
    """return_dropout_mask of backend "cuda" comes from its own kernel (no Triton needed): the Triton kernels'
    mask bit for bit, for sizes that are not a multiple of its 256-thread blocks."""
    from fastattn.cuda import attention as cuda_attention
    from fastattn.triton import attention as triton_attention
    seed = (1 << 40) + 12345 * Lq
    got = cuda_attention.dropout_mask(B, H, Lq, Lk, p, seed, "cpu")
    want = triton_attention.dropout_mask(B, H, Lq, Lk, p, seed, "cpu")
    assert got.dtype == torch.bool and torch.equal(got, want), f"{(got != want).sum().item()} keep bits differ"
    assert (B * H * Lq * Lk < 20) or abs(got.float().mean().item() - (1 - p)) < 0.05


SMEM_99KB = str(99 * 1024)  # what a block may opt in to on sm_86 / sm_89 GPUs (RTX 30xx / 40xx, A10, L4, L40)


def test_gpus_with_less_shared_memory_get_a_clear_error(monkeypatch):
    """On a GPU that lets a block opt in to 99 KB of shared memory (sm_86 / sm_89; the emulator is told so), the
    d256 backward's tiles do not fit: it raises an error that names the kernel, the reason and the way out; every
    other head dim runs forward and backward."""
    monkeypatch.setenv("FASTATTN_EMULATE_SMEM_OPTIN", SMEM_99KB)
    g = torch.Generator().manual_seed(5)

    def run(D, backward):
        q, k, v = (torch.randn(1, 2, 40, D, generator=g, dtype=torch.float16).requires_grad_() for _ in range(3))
        out = fastattn.attention(q, k, v, causal=True, backend="cuda")
        if backward:
            out.sum().backward()
        return out

    for D in (32, 64, 96, 128):
        assert torch.isfinite(run(D, backward=True)).all()
    run(256, backward=False)  # its forward tile needs exactly 99 KB
    with pytest.raises(RuntimeError, match=r"dkdv_kernel: needs more shared memory per block than this GPU "
                                           r"allows.*backend='triton'"):
        run(256, backward=True)
    monkeypatch.delenv("FASTATTN_EMULATE_SMEM_OPTIN")
    run(256, backward=True)


@pytest.mark.parametrize("extra", [
    dict(causal=True, kv_lens=True, dtype=torch.bfloat16),
    dict(key_padding=True, softcap=3.0, bias="heads", bias_grad=True, lse_grad=True),
    dict(dropout=0.25, window=(20, 5), H=4, Hkv=2, D=111),
    dict(split=3, alibi="heads", causal=True, alignment="bottom_right"),
], ids=["causal-kvlens-bf16", "padding-softcap-bias", "dropout-window-gqa-d111", "split-alibi"])
def test_head_dim_128_with_99kb_of_shared_memory(monkeypatch, extra):
    """Where a block may opt in to 99 KB (sm_86 / sm_89), the d128 forward and dQ kernels take keys 32 at a time
    (FwdCfg / DqCfg NARROW: 68 KB instead of 102 KB) and meet the rule as the wide tiles do: with masks (their
    key-tile ranges in 32-key tiles), the soft cap's extra shared memory, dropout, GQA and a split forward."""
    monkeypatch.setenv("FASTATTN_EMULATE_SMEM_OPTIN", SMEM_99KB)
    assert cuda.extension(torch.empty(0)).attention_fwd_tile(128) == (128, 32)
    split = extra.pop("split", None)
    case = AttentionCase(**{**dict(B=2, H=2, Lq=70, Lk=100, D=128, dtype=torch.float16, seed=128), **extra})
    if split is None:
        assert_case(case)
    else:
        with forced_splits(split):
            assert_case(case)
    monkeypatch.delenv("FASTATTN_EMULATE_SMEM_OPTIN")
    assert cuda.extension(torch.empty(0)).attention_fwd_tile(128) == (128, 64)


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


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(SINK_CASES))
def test_sinks(name, dtype):
    """Learnable sinks: the CUDA kernels' output and LSE rescaled, their backward given the sink-aware ones."""
    assert_case(AttentionCase(**{**dict(H=4, Lq=60, Lk=70, D=32, dtype=dtype, sinks=True, seed=5),
                                 **SINK_CASES[name]}))


# The features that change the kernels' code paths, per head-dim configuration (test_gpu_local_head_dims, shorter).
@pytest.mark.parametrize("D", [32, 96, 256])
@pytest.mark.parametrize("extra", list(LOCAL_HEAD_DIM_CASES.values()), ids=list(LOCAL_HEAD_DIM_CASES))
def test_local_head_dims(extra, D):
    extra = {**extra, "Lq": extra["Lq"] // 3, "Lk": extra["Lk"] // 3}
    assert_case(AttentionCase(B=2, H=4, Hkv=2, D=D, dtype=torch.bfloat16, seed=D, **extra))


# ------------------------------------------------------------------------------------------- split-KV
# The Triton backend's split cases (its fp32 case in bf16), splits forced: 16 is more splits than key tiles.
@pytest.mark.parametrize("name,splits", [(name, 3) for name in SPLIT_CASES] + [("decode-gqa-kv_lens-br", 16),
                                                                                ("varlen", 16)])
def test_split_kv(name, splits):
    """The forward's key tiles split into runs, one CTA each, merged by LSE in combine_kernel."""
    case = {"seed": splits, **SPLIT_CASES[name]}
    if case.get("dtype") == torch.float32:
        case["dtype"] = torch.bfloat16
    with forced_splits(splits):
        assert_case(AttentionCase(**case))


def test_split_kv_matches_unsplit_and_keeps_empty_rows_zero():
    """Splitting only regroups the sum: the merged output and LSE agree with the unsplit kernel's to rounding; a
    batch with kv_lens 0 (every split empty) stays 0 with LSE +inf."""
    B, H, Lq, Lk, D = 2, 2, 5, 300, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).half() for L in (Lq, Lk, Lk))
    kv_lens = torch.tensor([0, 270], dtype=torch.int32)
    runs = {}
    for splits in (1, 3, 8):
        with forced_splits(splits):
            runs[splits] = fastattn.attention(q, k, v, kv_lens=kv_lens, causal=True, causal_alignment="bottom_right",
                                              return_lse=True, backend="cuda")
    out1, lse1 = runs[1]
    for splits in (3, 8):
        out, lse = runs[splits]
        assert (out[0] == 0).all() and torch.isinf(lse[0]).all() and (lse[0] > 0).all()
        torch.testing.assert_close(out, out1, rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-5)
        assert not torch.equal(out[1], out1[1]) or not torch.equal(lse[1], lse1[1])  # really merged splits


# Packed GQA: a kv head's group of query heads as one CTA's rows (row r: query r / group of head hk·group + r % group)
# with every feature that allows it; decoding, speculative decoding, and rows that straddle CTAs, odd groups, varlen.
PACK_CASES = {
    "decode-kv_lens-br-lse": dict(B=3, H=4, Hkv=2, Lq=1, Lk=300, D=64, causal=True, alignment="bottom_right",
                                  kv_lens=True, lse_grad=True),
    "decode-padding-bias-softcap": dict(B=2, H=6, Hkv=2, Lq=1, Lk=200, D=40, key_padding=True, bias="batch",
                                        bias_grad=True, softcap=5.0, dtype=torch.bfloat16),
    "decode-mqa-d256": dict(B=1, H=4, Hkv=1, Lq=1, Lk=90, D=256, kv_lens=True),
    "spec-decode-causal-br": dict(B=2, H=8, Hkv=2, Lq=4, Lk=260, D=64, causal=True, alignment="bottom_right",
                                  kv_lens=True, lse_grad=True),
    "group3-causal-tl-window": dict(B=1, H=6, Hkv=2, Lq=45, Lk=100, D=32, causal=True, window=(20, -1)),
    "mask2d-softcap-bf16": dict(B=2, H=4, Hkv=1, Lq=33, Lk=150, D=96, bool_mask="2d", softcap=8.0,
                                dtype=torch.bfloat16),
    "bias2d-grad": dict(B=2, H=4, Hkv=2, Lq=20, Lk=80, D=32, bias="2d", bias_grad=True, causal=True),
    "window-both-br": dict(B=2, H=4, Hkv=1, Lq=7, Lk=120, D=128, alignment="bottom_right", window=(30, 5)),
    "varlen": dict(varlen=((3, 130), (40, 70), (0, 40), (1, 96)), H=4, Hkv=2, D=64, causal=True,
                   alignment="bottom_right"),
}


@pytest.mark.parametrize("name,splits", [(name, 1) for name in PACK_CASES] + [
    (name, 3) for name in ("decode-kv_lens-br-lse", "spec-decode-causal-br", "mask2d-softcap-bf16", "varlen")])
def test_pack_gqa(name, splits, monkeypatch):
    """The rule packs each of these (every output and gradient then passes §5), split 3 ways too."""
    packed = []
    rule = cuda_attention.pack_gqa
    monkeypatch.setattr(cuda_attention, "pack_gqa", lambda *args: packed.append(rule(*args)) or packed[-1])
    with forced_splits(splits):
        assert_case(AttentionCase(**{"seed": splits, **PACK_CASES[name]}))
    assert packed and all(packed)


@pytest.mark.parametrize("Lq,splits", [(1, 1), (1, 3), (6, 1), (6, 3)])
def test_pack_gqa_same_bits_as_unpacked(Lq, splits):
    """A packed row computes what the unpacked CTA's row did, over the same key tiles in the same order: the same
    bits (output and LSE)."""
    g = torch.Generator().manual_seed(splits)
    q = torch.randn(2, 8, Lq, 64, generator=g).half()
    k, v = (torch.randn(2, 2, 300, 64, generator=g).half() for _ in range(2))
    mask = torch.rand(Lq, 300, generator=g) > 0.2
    kw = dict(kv_lens=torch.tensor([300, 123], dtype=torch.int32), attn_bias=mask, causal=True,
              causal_alignment="bottom_right", softcap=10.0, return_lse=True, backend="cuda")
    with forced_splits(splits):
        with forced_pack_gqa(True):
            packed = fastattn.attention(q, k, v, **kw)
        with forced_pack_gqa(False):
            unpacked = fastattn.attention(q, k, v, **kw)
    assert all(torch.equal(a, b) for a, b in zip(packed, unpacked))


def test_pack_gqa_computes_each_kv_tile_once_per_group():
    """Speculative decoding (4 queries per head, groups of 4): unpacked, the CTA of each of the 8 query heads
    computes every key tile; packed, the CTA of each of the 2 kv heads does, for its 16 rows: a quarter of the
    MMAs (and of the K/V tile loads), the same output."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 4, 64, generator=g).half()
    k, v = (torch.randn(1, 2, 256, 64, generator=g).half() for _ in range(2))
    outs, mmas = {}, {}
    for pack in (False, True):
        def run():
            outs[pack] = fastattn.attention(q, k, v, causal=True, causal_alignment="bottom_right", backend="cuda")
        with forced_pack_gqa(pack):
            mmas[pack] = mma_count(run)
    assert mmas[True] > 0 and mmas[False] == 4 * mmas[True]
    assert torch.equal(outs[True], outs[False])


def test_pack_gqa_rule():
    """A group > 1 whose CTA rows may differ by head (no ALiBi, no dropout, bias / mask broadcast over heads) packs
    when the Triton backend's rule says so for the CUDA forward's query block; forced_pack_gqa overrides the rule,
    never the conditions."""
    from fastattn.triton.attention import pack_gqa as triton_rule
    k = torch.empty(2, 2, 50, 32)
    base = dict(alibi=None, dropout_p=0.0, bias=None, mask=None, varlen=None)
    rule = cuda_attention.pack_gqa
    for Lq in (1, 4, 40, 70, 200, 1000):
        assert rule(torch.empty(2, 8, Lq, 32), k, **base) == triton_rule(4, Lq, 128), Lq
    assert rule(torch.empty(2, 8, 4, 32), k, **base) and not rule(torch.empty(2, 8, 1000, 32), k, **base)
    with forced_pack_gqa(True):
        assert rule(torch.empty(2, 8, 1000, 32), k, **base)
    q = torch.empty(2, 8, 1, 32)
    with forced_pack_gqa(False):
        assert not rule(q, k, **base)
    assert rule(q, k, **{**base, "bias": torch.empty(2, 1, 1, 50), "mask": torch.empty(1, 1, 1, 50, dtype=torch.uint8)})
    for change in (dict(alibi=torch.ones(8)), dict(dropout_p=0.1), dict(bias=torch.empty(2, 8, 1, 50)),
                   dict(mask=torch.empty(1, 8, 1, 50, dtype=torch.uint8))):
        assert not rule(q, k, **{**base, **change}), change
        with forced_pack_gqa(True):
            assert not rule(q, k, **{**base, **change}), change
    assert not rule(q, torch.empty(2, 8, 50, 32), **base)  # no GQA
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)  # varlen decoding: q [total_q, H, D]
    assert rule(torch.empty(2, 8, 32), torch.empty(100, 2, 32), **{**base, "varlen": (cu, cu, 1, 50)})


def test_pack_gqa_arguments_are_checked():
    """pack_gqa other than 1 or H / Hkv, or with what a packed CTA cannot do (ALiBi, dropout, a per-head mask), or
    given to the backward: an error that names it."""
    emu = cuda.extension(torch.empty(0))
    q, k = torch.randn(1, 4, 4, 32).half(), torch.randn(1, 2, 8, 32).half()
    out, lse = torch.empty_like(q), torch.empty(1, 4, 4)

    def params(**kw):
        p = cuda_attention._params(q, k, k, kw.get("bias"), kw.get("mask"), None, 1.0, False, False,
                                   (kw.get("dropout", 0.0), 0), alibi=kw.get("alibi"))
        cuda_attention._set(p, "o", "o", out)
        p.lse = lse.data_ptr()
        p.pack_gqa = kw.get("pack", 2)
        return p

    for p in (params(pack=3), params(pack=0), params(dropout=0.1), params(alibi=torch.ones(4)),
              params(mask=torch.ones(1, 4, 4, 8, dtype=torch.uint8))):
        with pytest.raises(RuntimeError, match="pack_gqa"):
            emu.attention_fwd(p, 0)
    p = params()
    emu.attention_fwd(p, 0)  # accepted
    with pytest.raises(RuntimeError, match="pack_gqa"):
        emu.attention_bwd(p, 0)


def test_split_kv_arguments_are_checked():
    """num_splits out of range, or a split forward without its workspace, raise with the reason."""
    emu = cuda.extension(torch.empty(0))
    q = torch.randn(1, 1, 4, 32).half()
    p = cuda_attention._params(q, q, q, None, None, None, 1.0, False, False)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 4)
    cuda_attention._set(p, "o", "o", out)
    p.lse = lse.data_ptr()
    assert emu.attention_fwd_workspace_bytes(p) == 0
    for n in (0, 257):
        p.num_splits = n
        with pytest.raises(RuntimeError, match="num_splits"):
            emu.attention_fwd(p, 0)
    p.num_splits = 2
    assert emu.attention_fwd_workspace_bytes(p) == 2 * 4 * 33 * 4
    with pytest.raises(RuntimeError, match="workspace"):
        emu.attention_fwd(p, 0)
    assert emu.attention_fwd_tile(64) == (128, 64) and emu.attention_fwd_tile(256) == (64, 32)
    with pytest.raises(ValueError, match="head dim"):
        emu.attention_fwd_tile(48)


# ------------------------------------------------------------------------------------------- block skipping
def mma_count(fn):
    """Warp-level MMAs the kernels execute in fn() (the tiles they compute)."""
    emu = cuda.extension(torch.empty(0))
    emu.mma_count(reset=True)
    fn()
    return emu.mma_count(reset=True)


def test_bool_mask_skips_hidden_tiles_at_either_end():
    """A bool mask that hides whole tiles at the ends of a CTA's range (right or left padding, a causal or banded
    mask given as a tensor) costs the MMAs of the equivalent kv_lens / causal / window call in the forward, dQ and
    dK/dV kernels (a per-head mask: over the group's heads), with the same result."""
    B, H, Hkv, L, D = 2, 2, 1, 300, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g).half().requires_grad_()
    k, v = (torch.randn(B, Hkv, L, D, generator=g).half().requires_grad_() for _ in range(2))
    do = torch.randn(B, H, L, D, generator=g).half()
    kv_lens = torch.tensor([130, 300], dtype=torch.int32)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    padding = (torch.arange(L)[None, :] < kv_lens[:, None]).view(B, 1, 1, L)  # True = attend
    band = ((j <= i) & (j >= i - 40)).expand(B, H, L, L)  # per head (stride over heads): the dK/dV union
    band = band.contiguous()

    def run(**kw):
        with forced_pack_gqa(False):  # the per-head band cannot pack, the call without a mask could
            out = fastattn.attention(q, k, v, backend="cuda", **kw)
        return (out,) + torch.autograd.grad(out, (q, k, v), do)

    for mask, fast in ((padding, dict(kv_lens=kv_lens)), ((j <= i), dict(causal=True)),
                       (band, dict(causal=True, window_size=(40, -1)))):
        got, want = {}, {}
        masked = mma_count(lambda: got.update(r=run(attn_bias=mask)))
        positional = mma_count(lambda: want.update(r=run(**fast)))
        assert masked == positional, (masked, positional)
        for a, b in zip(got["r"], want["r"]):
            torch.testing.assert_close(a, b)
    left = torch.arange(L) >= 200  # left padding: the leading hidden tiles
    assert mma_count(lambda: run(attn_bias=left)) < mma_count(lambda: run(attn_bias=torch.ones(L, dtype=torch.bool)))


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
def split_problem(splits):
    """attention_problem whose forward runs with ``splits`` key splits (forced)."""
    def problem(case):
        fn, inputs, grad_outputs = attention_problem(case)

        def split(**kw):
            with forced_splits(splits):
                return fn(**kw)
        return split, inputs, grad_outputs
    return problem


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
    "attn-d64-decode-split": (split_problem(3), AttentionCase(
        B=2, H=4, Hkv=2, Lq=3, Lk=300, D=64, dtype=torch.float16, causal=True, alignment="bottom_right",
        kv_lens=True, lse_grad=True, seed=9)),
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
