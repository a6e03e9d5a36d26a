"""The CUDA kernels' dropout random numbers (csrc/attention/philox.h) equal Triton's tl.rand bit for bit, so both
backends drop the same attention weights and the mask of ``return_dropout_mask`` (drawn by the Triton
_dropout_mask_kernel) is the one the CUDA kernels applied; so does the torch version (fastattn.masks.philox_uniform,
context parallelism's torch blocks). No GPU needed: tests/philox_host.cpp runs the header's
functions on the CPU (built with the host C++ compiler, and with nvcc as CUDA source where nvcc is found) and is
compared with the Triton kernels under the interpreter (compiled Triton on a GPU machine)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import conftest
from conftest import DEVICE
from fastattn.masks import dropout_keep, philox_uniform
from fastattn.triton.attention import _keep, dropout_mask

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "philox_host.cpp"

# Seeds of every width: fastattn.attention draws them in [2**31, 2**62), so Triton types them int64.
SEEDS = [0, 12345, 2**31 - 1, 2**31, 2**32 + 5, 0x123456789ABCDEF, 2**62 - 1]


@pytest.fixture(scope="module", params=["c++", "nvcc"])
def driver(request, tmp_path_factory):
    """A function sending command lines to the compiled philox_host and returning its output lines."""
    return conftest.host_driver(request.param, DRIVER, tmp_path_factory)


@triton.jit
def _uniform_kernel(Out, Counters, seed, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(Counters + offs, mask=offs < N, other=0)
    tl.store(Out + offs, tl.rand(seed, c), mask=offs < N)


@triton.jit
def _keep_window_kernel(Keep, seed, dropout_p, bh, Lq, Lk, i0, j0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows i0.., columns j0.. of (b·H + h) = bh's keep-mask, through the attention kernels' own _keep."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    keep = _keep(seed, dropout_p, bh, (i0 + rm)[:, None], (j0 + rn)[None, :], Lq, Lk, 0)
    tl.store(Keep + rm[:, None] * BLOCK_N + rn[None, :], keep.to(tl.uint8))


def _counters():
    g = np.random.default_rng(0)
    edges = [0, 1, 2, 3, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345, 2**53 + 7, 2**62 + 3,
             2**63 - 1]
    spread = [int(x) for x in g.integers(0, 2**63 - 1, 200, dtype=np.int64)]
    small = [int(x) for x in g.integers(0, 2**32, 100, dtype=np.int64)]
    return edges + spread + small


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_floats_match_triton(driver, seed):
    counters = _counters()
    c = torch.tensor(counters, dtype=torch.int64, device=DEVICE)
    out = torch.empty(len(counters), dtype=torch.float32, device=DEVICE)
    _uniform_kernel[(triton.cdiv(len(counters), 128),)](out, c, seed, len(counters), BLOCK=128)
    want = out.cpu().numpy().view(np.uint32)
    got = np.array(driver([f"u {seed} " + " ".join(map(str, counters))])[0].split(), dtype=np.uint64).astype(np.uint32)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"seed {seed}: {bad.size} of {len(counters)} differ, first at counter {counters[bad[0]]}: "
                           f"C++ {got[bad[0]]:#010x}, Triton {want[bad[0]]:#010x}")
    u = want.view(np.float32)
    assert (u >= 0).all() and (u < 1).all() and len(set(want.tolist())) > len(counters) - 2


@pytest.mark.parametrize("seed,p", [(SEEDS[1], 0.3), (SEEDS[3], 0.1), (SEEDS[4], 1 / 3), (SEEDS[6], 0.9)])
def test_keep_mask_matches_dropout_mask(driver, seed, p):
    """The whole [B, H, Lq, Lk] mask of fastattn.triton.attention.dropout_mask (what return_dropout_mask gives)."""
    B, H, Lq, Lk = 2, 3, 37, 45
    want = dropout_mask(B, H, Lq, Lk, p, seed, DEVICE).cpu()
    lines = driver([f"m {seed} {p!r} {H} {Lq} {Lk} {b} {h} 0 {Lq} 0 {Lk}" for b in range(B) for h in range(H)])
    got = torch.tensor([[c == "1" for c in line] for line in lines]).view(B, H, Lq, Lk)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {want.numel()} keep bits differ"
    assert abs(want.float().mean().item() - (1 - p)) < 0.05


@pytest.mark.parametrize("seed", [SEEDS[3], SEEDS[6]])
def test_keep_mask_at_counters_past_2_32(driver, seed):
    """A window of a large problem's mask: (b·H + h)·Lq·Lk ≈ 1.2e12, so counters need their high word."""
    H, Lq, Lk, b, h, i0, j0 = 16, 100_000, 100_000, 7, 5, 99_968, 99_936
    keep = torch.empty(32 * 64, dtype=torch.uint8, device=DEVICE)
    _keep_window_kernel[(1,)](keep, seed, 0.25, b * H + h, Lq, Lk, i0, j0, BLOCK_M=32, BLOCK_N=64)
    want = keep.cpu().bool()
    got = torch.tensor([c == "1" for c in driver([f"m {seed} 0.25 {H} {Lq} {Lk} {b} {h} {i0} 32 {j0} 64"])[0]])
    assert ((b * H + h) * Lq + i0) * Lk + j0 > 2**40
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {want.numel()} keep bits differ"


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_philox_matches_triton(seed):
    """fastattn.masks.philox_uniform equals tl.rand at every counter width, and dropout_keep the kernels' mask."""
    counters = _counters()
    c = torch.tensor(counters, dtype=torch.int64, device=DEVICE)
    out = torch.empty(len(counters), dtype=torch.float32, device=DEVICE)
    _uniform_kernel[(triton.cdiv(len(counters), 128),)](out, c, seed, len(counters), BLOCK=128)
    got = philox_uniform(seed, c.cpu())
    assert torch.equal(got.view(torch.int32), out.cpu().view(torch.int32)), \
        f"{(got != out.cpu()).sum().item()} of {len(counters)} uniforms differ"
    B, H, Lq, Lk = 2, 3, 37, 45
    want = dropout_mask(B, H, Lq, Lk, 0.3, seed, DEVICE).cpu()
    assert torch.equal(dropout_keep(seed, 0.3, torch.arange(B * H * Lq * Lk).view(B, H, Lq, Lk)), want)
