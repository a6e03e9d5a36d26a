"""The CUDA C++ extension fastattn._C: it is built and imports wherever nvcc is (a compile check on CPU-only CI),
its bindings round-trip, and backend="cuda" fails clearly where it cannot run. No GPU needed."""
import os
import re
import shutil

import pytest
import torch

import fastattn
from fastattn import cuda, dispatch

NVCC = (os.environ.get("NVCC") or shutil.which("nvcc")
        or next((p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),)
                 if os.path.exists(p)), None))
BUILT_WITHOUT = ("FASTATTN_BUILD_CUDA=0" if os.environ.get("FASTATTN_BUILD_CUDA") == "0"
                 else "no nvcc on this machine" if NVCC is None else None)
needs_build = pytest.mark.skipif(BUILT_WITHOUT is not None, reason=f"fastattn._C is not built: {BUILT_WITHOUT}")


@pytest.fixture(scope="module")
def C():
    mod, why = cuda._load()
    assert mod is not None, (f"nvcc is at {NVCC}, so fastattn._C should be built: {why}. Build it with `make "
                             "build`, `python setup.py build_ext --inplace` or `pip install --no-deps "
                             "--no-build-isolation -e .`")
    return mod


@needs_build
def test_extension_imports(C):
    assert C.version == fastattn.__version__
    assert (C.FLOAT16, C.BFLOAT16, C.FLOAT32) == (0, 1, 2)


@needs_build
@pytest.mark.skipif(os.environ.get("FASTATTN_BUILD_EMULATOR") == "0", reason="FASTATTN_BUILD_EMULATOR=0")
def test_emulator_build_imports(C):
    """fastattn._C_emu, the same kernels for the CPU emulator, is built with fastattn._C."""
    emu, why = cuda._load("_C_emu")
    assert emu is not None, why
    assert emu.emulated and not C.emulated and emu.version == C.version and emu.compiled_archs() == []


@needs_build
def test_compiled_archs_are_the_requested_ones(C):
    raw = os.environ.get("FASTATTN_CUDA_ARCHS", "").strip() or "80;90"  # setup.py's default
    requested = [a.lower().removeprefix("sm_").replace(".", "") for a in re.split(r"[;,\s]+", raw) if a]
    assert set(requested) <= set(C.compiled_archs()), (requested, C.compiled_archs())


def _cuobjdump():
    try:
        import triton
        return triton.knobs.nvidia.cuobjdump.path
    except Exception:  # no triton / no bundled tool: the toolkit's, if any
        return shutil.which("cuobjdump")


@needs_build
def test_attention_kernels_do_not_spill(C):
    """Every attention / softmax kernel of fastattn._C keeps its state in registers on every compiled arch (no
    stack: a spill in the inner loop costs local-memory traffic per tile). The broadcast-dbias kernel at head dim
    256 and the LayerNorm backward may use a few bytes of stack (at most 64), and so may the d64 dQ kernel with
    a bias or mask, dropout and a soft cap or ALiBi all at once (at most 8: ptxas keeps it at 168 registers on
    sm_90, and dropout's ds = 0 where p = 1, which keeps rows with one visible key exactly 0, spills a word)."""
    import subprocess
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (triton's bundled one or the CUDA toolkit's)")
    out = subprocess.run([tool, "--dump-resource-usage", C.__file__], capture_output=True, text=True,
                         check=True).stdout
    found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", out)
    assert len(found) >= 250 * len(C.compiled_archs()), f"cuobjdump listed {len(found)} kernels:\n{out[-2000:]}"
    stacked = {name: int(stack) for name, _, stack in found if int(stack) > 0}
    allowed = {r"dbias_kernel": 64, r"layer_norm_bwd_kernel": 64,
               r"dq_kernelI\w+Li64ELi4ELi64ELb1ELb1ELb1E": 8}  # <T, d64, 4 warps, 64 keys, bias, dropout, mods>
    assert all(any(re.search(a, name) and s <= most for a, most in allowed.items()) for name, s in stacked.items()), \
        stacked


@needs_build
def test_attention_head_dims(C):
    from fastattn.cuda.attention import HEAD_DIMS
    assert all(C.attention_supports_head_dim(d) for d in HEAD_DIMS)
    assert not C.attention_supports_head_dim(40) and not C.attention_supports_head_dim(512)


@needs_build
def test_attn_params_round_trip(C):
    p = C.AttnParams()
    assert p.q == 0 and p.lse == 0 and p.B == 0 and p.scale == 1.0 and p.causal is False  # params.h defaults
    fields = [n for n in dir(p) if not n.startswith("_")]
    pointers = {"q", "k", "v", "o", "lse", "bias", "mask", "kv_lens", "alibi", "cu_seqlens_q", "cu_seqlens_k", "dout",
                "dlse", "dq", "dk", "dv", "ds", "workspace"}
    assert pointers <= set(fields)
    values = {}
    for i, name in enumerate(fields):
        cur = getattr(p, name)
        if name in pointers:
            values[name] = (1 << 47) + 16 * i
        elif isinstance(cur, bool):
            values[name] = True
        elif isinstance(cur, float):
            values[name] = 0.5 + i
        else:
            values[name] = 1000 + i
        setattr(p, name, values[name])
    values["seed"] = p.seed = (1 << 64) - 1  # uint64
    for name, value in values.items():
        assert getattr(p, name) == value, name


@needs_build
def test_row_entry_points_report_bad_arguments(C):
    common = dict(mask=0, rows=2, cols=8, x_dtype=0, y_dtype=0, mask_dtype=2, lead1=1, lead2=1, mask_s0=0,
                  mask_s1=0, mask_s2=0, scale=1.0, stream=0)
    with pytest.raises(RuntimeError, match="x and y are required"):
        C.softmax_fwd(x=0, y=0, **common)
    with pytest.raises(RuntimeError, match="unknown dtype code 7"):
        C.softmax_fwd(x=256, y=256, **{**common, "x_dtype": 7})
    with pytest.raises(RuntimeError, match="bad problem size"):
        C.softmax_fwd(x=256, y=256, **{**common, "cols": 0})
    with pytest.raises(RuntimeError, match="both dw_partial and db_partial"):
        C.layer_norm_bwd(s=256, w=0, dy=256, dsum=0, dx=256, mean=256, rstd=256, dw_partial=256, db_partial=0,
                         rows=2, cols=8, dtype=0, w_dtype=0, partials=1, stream=0)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FASTATTN_CUDA_EMULATE")
    x = torch.randn(2, 3, 8, 16)
    calls = [lambda: fastattn.attention(x, x, x, backend="cuda"),
             lambda: fastattn.softmax(x, backend="cuda"),
             lambda: fastattn.layer_norm(x, 16, backend="cuda")]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"backend='cuda'.*cannot run here: .*(cpu|CPU|not built|import)"):
            call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_unavailable_without_gpu(monkeypatch):
    monkeypatch.delenv("FASTATTN_CUDA_EMULATE")
    assert not cuda.available()
    why = cuda.why_unavailable()
    assert "not built" in why or "failed to import" in why or "no CUDA device" in why
    assert "cuda" not in dispatch.available_backends("cpu")
    assert dispatch.select("auto", torch.empty(1)) == "torch"


def test_arch_compatibility_rule():
    assert cuda._runs_on("80", (8, 0)) and cuda._runs_on("80", (8, 6)) and cuda._runs_on("90", (9, 0))
    assert not cuda._runs_on("80", (9, 0)) and not cuda._runs_on("90", (8, 9))
    assert cuda._runs_on("90a", (9, 0)) and not cuda._runs_on("90a", (10, 0))
    assert cuda._runs_on("100f", (10, 3)) and cuda._runs_on("120", (12, 1))


def test_kernel_modules_share_signatures():
    """fastattn.cuda.<op> is a drop-in for fastattn.triton.<op>: same functions, same parameters."""
    import inspect
    for op in ("attention", "softmax", "layer_norm"):
        tri, cu = dispatch.kernels(op, "triton"), dispatch.kernels(op, "cuda")
        for fn in ("forward", "backward") + (("num_partials",) if op == "layer_norm" else ()):
            assert inspect.signature(getattr(tri, fn)) == inspect.signature(getattr(cu, fn)), (op, fn)
    cu = dispatch.kernels("attention", "cuda")  # the one Triton option the CUDA kernels do not take: named
    with pytest.raises(NotImplementedError, match="origin .* not supported by the CUDA C.. kernels"):
        cu.forward(*[None] * 11, origin=(0, 0, 1, 1))
    with pytest.raises(NotImplementedError, match="origin .* not supported by the CUDA C.. kernels"):
        cu.backward(*[None] * 17, origin=(0, 0, 1, 1))


@needs_build
def test_attention_marshalling():
    """AttnParams from tensors (strides in elements, broadcast dims 0), head-dim padding and aligned copies; the
    tensors may be on the CPU here, as nothing is launched."""
    from fastattn.cuda import attention as A

    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 5, 7, 40
    q = torch.randn(B, H, Lq, D + 2, dtype=torch.float16)[..., 1:D + 1]  # rows off 16 bytes: copied
    k, v = torch.randn(B, Hkv, Lk, D, dtype=torch.float16), torch.randn(B, Hkv, Lk, D, dtype=torch.float16)
    assert not A._aligned(q)
    Dp = A.padded_head_dim(D)
    assert Dp == 64
    qp, kp = A._input(q, Dp), A._input(k, Dp)
    assert qp.shape[-1] == Dp and A._aligned(qp) and torch.equal(qp[..., :D], q) and (qp[..., D:] == 0).all()
    kk = torch.randn(B, Hkv, Lk, 64, dtype=torch.float16)
    assert A._input(kk, 64) is kk  # aligned and of a supported size: used as is
    bias = A._bias(torch.randn(1, H, Lq, Lk), q)  # fp32 bias: converted to q's dtype
    mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool).expand(B, 1, Lq, Lk)
    lens = torch.full((B,), Lk, dtype=torch.int32)
    p = A._params(qp, kp, kp, bias, A._mask(mask), lens, 0.125, True, True)
    assert (p.B, p.H, p.Hkv, p.Lq, p.Lk, p.D, p.dtype) == (B, H, Hkv, Lq, Lk, Dp, 0)
    assert (p.scale, p.causal, p.bottom_right) == (0.125, True, True)
    assert (p.q, p.q_sb, p.q_sh, p.q_sl) == (qp.data_ptr(), *qp.stride()[:3])
    assert (p.k, p.v, p.k_sl) == (kp.data_ptr(), kp.data_ptr(), Dp)
    assert bias.dtype == torch.float16 and p.bias == bias.data_ptr()
    assert (p.bias_sb, p.bias_sh, p.bias_sm, p.bias_sn) == (0, Lq * Lk, Lk, 1)
    assert (p.mask_sb, p.mask_sh, p.mask_sm, p.mask_sn) == (Lk, 0, 0, 1)
    assert p.kv_lens == lens.data_ptr() and p.dout == 0 and p.ds == 0
    out = torch.empty(B, H, Lq, D, dtype=torch.float16)
    scratch = A._output(out, Dp)
    assert scratch is not out and scratch.shape[-1] == Dp
    scratch.normal_()
    A._finish(out, scratch)
    assert torch.equal(out, scratch[..., :D])
    with pytest.raises(NotImplementedError, match="float32.*backend='triton'"):
        A._check(q.float(), k.float(), v.float(), None, None, None)


@needs_build
def test_attention_marshalling_varlen_dropout():
    """A packed batch: batch strides 0, row strides the packed tensors' first stride, Lq/Lk = max_seqlen, B from
    cu_seqlens, totals and cu_seqlens pointers; dropout's p and seed (any uint64)."""
    from fastattn.cuda import attention as A

    H, Hkv, D = 4, 2, 64
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 6, 6], dtype=torch.int32)
    q, k = torch.randn(10, H, D, dtype=torch.float16), torch.randn(6, Hkv, D, dtype=torch.float16)
    varlen = (cu_q, cu_k, 7, 5)
    p = A._params(q, k, k, None, None, None, 0.125, True, True, (0.25, 2**62 + 3), varlen)
    assert (p.B, p.H, p.Hkv, p.Lq, p.Lk, p.D) == (3, H, Hkv, 7, 5, D)
    assert (p.q_sb, p.q_sh, p.q_sl) == (0, D, H * D) and (p.k_sb, p.k_sh, p.k_sl) == (0, D, Hkv * D)
    assert (p.cu_seqlens_q, p.cu_seqlens_k, p.total_q, p.total_k) == (cu_q.data_ptr(), cu_k.data_ptr(), 10, 6)
    assert p.dropout_p == 0.25 and p.seed == 2**62 + 3
    assert A._lse_shape(q, varlen) == (H, 10) and A._shape(q, k, varlen) == (3, H, 7, 5)
    plain = A._params(q[None].transpose(1, 2), k[None].transpose(1, 2), k[None].transpose(1, 2), None, None, None,
                      0.125, False, False)
    assert (plain.cu_seqlens_q, plain.total_q, plain.dropout_p, plain.seed) == (0, 0, 0.0, 0)


def test_attention_varlen_dropout_checks():
    """The CUDA module's own checks of packed-batch and dropout arguments (no extension or GPU needed)."""
    from fastattn.cuda import attention as A

    q = torch.randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    A._check_varlen(q, q, (cu, cu, 6, 6))
    A._check_dropout((0.5, 2**64 - 1))
    with pytest.raises(ValueError, match="cu_seqlens_q must be a contiguous int32"):
        A._check_varlen(q, q, (cu.long(), cu, 6, 6))
    with pytest.raises(ValueError, match="cu_seqlens_k must be a contiguous int32"):
        A._check_varlen(q, q, (cu, torch.tensor([0, 0, 4, 0, 10], dtype=torch.int32)[::2], 6, 6))
    with pytest.raises(ValueError, match="B \\+ 1 entries"):
        A._check_varlen(q, q, (cu, cu[:2], 6, 6))
    with pytest.raises(ValueError, match="max_seqlen_k must be an int"):
        A._check_varlen(q, q, (cu, cu, 6, 6.0))
    with pytest.raises(ValueError, match="packed batch has q"):
        A._check_varlen(q[None], q, (cu, cu, 6, 6))
    with pytest.raises(ValueError, match="dropout_p must lie in"):
        A._check_dropout((1.0, 0))


def test_attention_local_checks():
    """window_size, alibi_slopes and softcap are taken by backend "cuda" and checked by name (no extension or GPU
    needed: the checks come before any tensor must be on a GPU); block counting stays the Triton kernels'."""
    from fastattn.cuda import attention as A

    B, H = 3, 2
    q = torch.randn(B, H, 5, 64)
    A._check_local(q, q, (4, 0), None, 5.0, None)
    A._check_local(q, q, (-1, 7), None, 0.0, None)
    with pytest.raises(NotImplementedError, match="count.*backend='triton'"):
        A._check_local(q, q, (-1, -1), None, 0.0, {})
    for window in ((3,), (-2, 1), (1.5, 2), 5, (True, 0)):
        with pytest.raises(ValueError, match="window_size"):
            A._check_local(q, q, window, None, 0.0, None)
    for softcap in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="softcap"):
            A._check_local(q, q, (-1, -1), None, softcap, None)
    with pytest.raises(TypeError, match="alibi_slopes must be a float32"):
        A._check_local(q, q, (-1, -1), torch.ones(H, dtype=torch.float64), 0.0, None)
    for bad in (torch.ones(H + 1), torch.ones(B + 1, H), torch.ones(H, B).t(), torch.ones(B, H, 1)):
        with pytest.raises(ValueError, match="alibi_slopes must have shape"):
            A._check_local(q, q, (-1, -1), bad, 0.0, None)
    # a packed batch: B from cu_seqlens
    qp = torch.randn(10, H, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        A._check_local(qp, qp, (-1, -1), torch.ones(B, H), 0.0, None, (cu, cu, 6, 6))
    # the window sides the kernels get: −1 also for a side past every key (and so within int32)
    assert [A._window_side(w, 5, 7) for w in (-1, 0, 11, 12, 10**12)] == [-1, 0, 11, -1, -1]


@needs_build
def test_attention_marshalling_local():
    """window (causal folded in by the kernels, huge sides made unbounded), ALiBi slopes' pointer and batch
    stride (0 for slopes shared by the batch), soft cap."""
    from fastattn.cuda import attention as A

    B, H, Lq, Lk, D = 2, 4, 5, 7, 64
    q, k = torch.randn(B, H, Lq, D, dtype=torch.float16), torch.randn(B, H, Lk, D, dtype=torch.float16)
    p = A._params(q, k, k, None, None, None, 0.125, True, False)
    assert (p.window_left, p.window_right, p.alibi, p.alibi_sb, p.softcap) == (-1, -1, 0, 0, 0.0)
    for alibi, sb in ((torch.ones(H), 0), (torch.ones(1, H), 0), (torch.ones(B, H), H)):
        p = A._params(q, k, k, None, None, None, 0.125, True, False, window=(3, 10**9), alibi=alibi, softcap=30.0)
        assert (p.window_left, p.window_right, p.softcap) == (3, -1, 30.0)
        assert (p.alibi, p.alibi_sb) == (alibi.data_ptr(), sb)
