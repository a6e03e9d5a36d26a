"""The CUDA kernels' local attention (csrc/attention/local.h) on the CPU: the window rule is the reference's, the key
tiles a query block visits (forward, dQ) and the query tiles a key block visits (dK/dV) are Triton's _key_range /
_query_range and miss no visible (query, key) pair, and the soft cap's tanh and derivative are accurate. No GPU
needed: tests/local_host.cpp runs the header's functions, built with the host C++ compiler and with nvcc (as CUDA
source) where nvcc is found. (On a GPU the soft cap uses div.full / ex2.approx, Triton's own instructions: the
`gpu` tests of backend "cuda" cover that path.)"""
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
from fastattn import reference

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "local_host.cpp"


@pytest.fixture(scope="module", params=["c++", "nvcc"])
def driver(request, tmp_path_factory):
    """A function sending command lines to the compiled local_host and returning its output lines."""
    return conftest.host_driver(request.param, DRIVER, tmp_path_factory)


# ------------------------------------------------------------------------------------------- windows and tiles
def _triton_key_range(m0, kv_len, shift, left, right, BM, BN):
    """fastattn/triton/attention.py _key_range, line by line (left / right: −1 = unbounded)."""
    lo, hi = 0, kv_len
    if right >= 0:
        hi = max(min(hi, m0 + BM + shift + right), 0)
    if left >= 0:
        lo = max(m0 + shift - left, 0) // BN * BN
    return lo, hi


def _triton_query_range(n0, q_len, kv_len, shift, left, right, BM, BN):
    """fastattn/triton/attention.py _query_range, with the dK/dV kernel's skip of padding key blocks."""
    lo, hi = 0, q_len
    if right >= 0:
        lo = max(n0 - shift - right, 0) // BM * BM
    if left >= 0:
        hi = min(max(n0 + BN - shift + left, 0), q_len)
    if n0 >= kv_len:
        hi = 0
    return lo, hi


def _cases(n, seed):
    """(Lq, Lk, causal, left, right, q_len, k_len, kv_len, bottom_right, BM, BN): grids, sequences within them
    (packed: shorter than the grid), kv_lens padding, every kind of window including empty rows, huge sides
    (normalised to unbounded) and Lq != Lk both ways, with the kernels' tile shapes and smaller ones."""
    rng = random.Random(seed)
    tiles = [(16, 16), (16, 32), (32, 64), (64, 64), (128, 64), (64, 32), (32, 16)]
    for _ in range(n):
        Lq, Lk = rng.randint(1, 150), rng.randint(1, 150)
        q_len = Lq if rng.random() < 0.6 else rng.randint(0, Lq)
        k_len = Lk if rng.random() < 0.6 else rng.randint(0, Lk)
        kv_len = k_len if rng.random() < 0.6 else rng.randint(0, k_len)
        side = lambda: rng.choice([-1, -1, 0, 1, rng.randint(0, 40), rng.randint(0, 200), 10**6, 2**31 - 1])  # noqa
        causal = rng.random() < 0.3
        yield (Lq, Lk, causal, side(), side(), q_len, k_len, kv_len, rng.random() < 0.5, *rng.choice(tiles))


def _parse_pairs(tokens):
    return [tuple(int(v) for v in t.split(",")) for t in tokens]


def test_window_tiles_match_reference_and_triton(driver):
    cases = list(_cases(400, seed=0))
    lines = []
    for Lq, Lk, causal, left, right, q_len, k_len, kv_len, br, BM, BN in cases:
        shift = kv_len - q_len if br else 0
        lines.append(f"w {Lq} {Lk} {int(causal)} {left} {right} {q_len} {kv_len} {shift} {BM} {BN}")
    out = driver(lines)
    assert len(out) == len(cases)
    for case, got in zip(cases, out):
        Lq, Lk, causal, left, right, q_len, k_len, kv_len, br, BM, BN = case
        shift = kv_len - q_len if br else 0
        if causal:
            right = 0
        parts = got.split(" ")
        r_at, k_at, q_at = parts.index("R"), parts.index("K"), parts.index("Q")
        vis_bits, ranges = parts[0][1:], _parse_pairs(parts[r_at + 1:k_at])
        key_tiles, query_tiles = _parse_pairs(parts[k_at + 1:q_at]), _parse_pairs(parts[q_at + 1:])

        # The reference's rule for this sequence (kv_lens = kv_len, alignment from the shift).
        want = reference.visible_keys(1, q_len, k_len, device="cpu", causal=causal, bottom_right=br,
                                      kv_lens=torch.tensor([kv_len]), window_size=(left, right))
        want = (want.expand(1, 1, q_len, k_len)[0, 0, :, :kv_len] if want is not None
                else torch.ones(q_len, kv_len, dtype=torch.bool))
        vis = torch.tensor([c == "1" for c in vis_bits], dtype=torch.bool).view(q_len, kv_len)
        assert torch.equal(vis, want), case

        # key_range(i): exactly the visible keys of row i (a window is contiguous).
        for i, (lo, hi) in enumerate(ranges):
            row = torch.zeros(kv_len, dtype=torch.bool)
            row[max(lo, 0):max(hi, 0)] = True
            assert torch.equal(row, vis[i]), (case, i, lo, hi)

        # Forward / dQ: Triton's key range, inside the keys, and no visible pair of the block left out.
        for (first, count), m0 in zip(key_tiles, range(0, q_len, BM)):
            lo, hi = _triton_key_range(m0, kv_len, shift, left, right, BM, BN)
            want_tiles = [n // BN for n in range(lo, hi, BN)]
            got_tiles = list(range(first, first + count))
            assert got_tiles == want_tiles, (case, m0)
            assert count == 0 or (first >= 0 and (first + count - 1) * BN < kv_len), (case, m0)
            seen = torch.zeros(kv_len, dtype=torch.bool)
            for t in got_tiles:
                seen[t * BN:(t + 1) * BN] = True
            assert not (vis[m0:m0 + BM] & ~seen).any(), (case, m0)

        # dK/dV: Triton's query range, tiles starting inside the queries, no visible pair of the block left out.
        for (m_begin, count), n0 in zip(query_tiles, range(0, kv_len + BN, BN)):
            lo, hi = _triton_query_range(n0, q_len, kv_len, shift, left, right, BM, BN)
            want_starts = list(range(lo, hi, BM))
            got_starts = [m_begin + t * BM for t in range(count)]
            assert got_starts == want_starts, (case, n0)
            assert all(0 <= m < q_len and m % BM == 0 for m in got_starts), (case, n0)
            seen = torch.zeros(q_len, dtype=torch.bool)
            for m in got_starts:
                seen[m:m + BM] = True
            assert not (vis[:, n0:n0 + BN] & ~seen[:, None]).any(), (case, n0)


def test_window_skips_blocks_far_from_the_diagonal(driver):
    """Causal local attention at L = 2048, window 256, the forward's and dK/dV's tiles: each block visits the
    (w + block) / tile tiles around its diagonal, O(L·w) work instead of O(L²)."""
    L, w = 2048, 256
    (line,) = driver([f"w {L} {L} 1 {w} -1 {L} {L} 0 128 64"])  # forward: 128 queries x 64-key tiles
    parts = line.split(" ")
    counts = [c for _, c in _parse_pairs(parts[parts.index("K") + 1:parts.index("Q")])]
    assert counts[:3] == [2, 4, 6] and set(counts[3:]) == {(w + 128) // 64}
    (line,) = driver([f"w {L} {L} 1 {w} -1 {L} {L} 0 64 64"])  # dK/dV: 64 keys x 64-query tiles
    parts = line.split(" ")
    qcounts = [c for _, c in _parse_pairs(parts[parts.index("Q") + 1:])]
    assert max(qcounts) == (w + 64) // 64 and qcounts[-1] == 0 and sum(qcounts) < (L // 64) * (w // 64 + 1)


# ------------------------------------------------------------------------------------------- soft cap
def _f32(bits):
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def test_softcap_tanh_and_derivative(driver):
    rng = np.random.default_rng(0)
    xs = np.concatenate([np.linspace(-3, 3, 601), rng.normal(0, 0.2, 300), rng.normal(0, 10, 300),
                         [0.0, -0.0, 0.29999998, 0.3, 0.30000001, -0.3, 1e-30, -1e-20, 20.0, 40.0, -43.0, 44.5, 60.0,
                          -1e4, 3e38, float("inf"), float("-inf")]]).astype(np.float32)
    (line,) = driver(["c " + " ".join(str(b) for b in xs.view(np.uint32).tolist())])
    got = [tuple(_f32(int(b)) for b in tok.split(",")) for tok in line.split()]
    assert len(got) == len(xs)
    for x, (t, d) in zip(xs.astype(np.float64), got):
        want_t = math.tanh(x)
        # 1 − tanh² in float64 without cancellation: 4 / (e^a + e^-a)²
        want_d = 0.0 if abs(x) > 300 else 4.0 / (math.exp(abs(x)) + math.exp(-abs(x))) ** 2
        assert abs(float(t) - want_t) <= 1e-6 * abs(want_t) + 1e-45, (x, t, want_t)
        if want_d > 1e-37:  # fp32 normal range: relative precision kept where tanh → ±1
            assert abs(float(d) - want_d) <= 2e-6 * want_d, (x, d, want_d)
        else:
            assert 0.0 <= float(d) <= 2e-37 and abs(float(t)) == 1.0, (x, t, d)
