// Local attention and the soft cap in the CUDA kernels: which (query i, key j) a window lets through, which key
// tiles a block of query rows visits (forward, dQ) and which query tiles a block of keys visits (dK/dV), and the
// soft cap's tanh and derivative. Semantics and formulas of fastattn/triton/attention.py (_visible, _key_range,
// _query_range, _scores), rewritten for the CUDA kernels' tiles.
//
// No CUDA headers: the functions are __host__ __device__ under nvcc and plain inline C++ otherwise, so that
// tests/test_cuda_local.py (through tests/local_host.cpp) checks them on a machine without a GPU, against the
// reference's visibility rule and against Triton's block ranges.
#pragma once
#include <cmath>
#include <cstdint>

#include "params.h"
#include "philox.h"  // FASTATTN_HD

namespace fastattn {

// Longest Lq, Lk the kernels take (attention_fwd / attention_bwd refuse longer ones), and the j − i offset that
// stands for an unbounded side of a window: larger than any |j − i| and than any normalised window side
// (< Lq + Lk, normalize_window), small enough that i + kUnbounded, m0 + BM + kUnbounded and n0 + BN + kUnbounded
// cannot overflow an int.
constexpr int kMaxLen = 1 << 28;
constexpr int kUnbounded = 1 << 29;

// Folds causal into the window (window_right = 0) and makes a side that reaches past every key unbounded (−1):
// d(i) lies in [−Lq, Lq + Lk), so a side >= Lq + Lk changes no visible key. Windows are then < Lq + Lk.
FASTATTN_HD void normalize_window(AttnParams& p) {
  if (p.causal) p.window_right = 0;
  const int64_t reach = static_cast<int64_t>(p.Lq) + p.Lk;
  if (p.window_left >= reach) p.window_left = -1;
  if (p.window_right >= reach) p.window_right = -1;
}

// The window of one sequence, as bounds on j − i: query i sees key j by position iff i < q_len, j < kv_len and
// lo_off <= j − i <= hi_off, i.e. d(i) − left <= j <= d(i) + right with d(i) = i + shift (shift = kv_len − q_len
// bottom-right, else 0); ±kUnbounded for a side of −1. p must have been through normalize_window.
struct Window {
  int q_len, kv_len, lo_off, hi_off;

  FASTATTN_HD Window(const AttnParams& p, int q_len_, int kv_len_, int shift)
      : q_len(q_len_),
        kv_len(kv_len_),
        lo_off(p.window_left >= 0 ? shift - p.window_left : -kUnbounded),
        hi_off(p.window_right >= 0 ? shift + p.window_right : kUnbounded) {}

  // Keys [lo, hi) visible by position to query i (none for rows past q_len).
  FASTATTN_HD void key_range(int i, int& lo, int& hi) const {
    lo = i + lo_off > 0 ? i + lo_off : 0;
    const int end = i + hi_off + 1;
    hi = i < q_len ? (end < kv_len ? end : kv_len) : 0;
  }

  // Query i sees key j by position (key_range from the key's side).
  FASTATTN_HD bool visible(int i, int j) const {
    return i < q_len && j < kv_len && j - i >= lo_off && j - i <= hi_off;
  }

  // Forward / dQ, as Triton's _key_range: the BN-key tiles first .. first + count − 1 that a block of query rows
  // [m0, m0 + BM) visits, keys [lo, hi) with lo = max(m0 + shift − left, 0) rounded down to a tile (the first row's
  // first key) and hi = min(kv_len, m0 + BM + shift + right) (one past the last row's last key); none when
  // hi <= lo. Every tile lies in [0, kv_len) rounded up to a tile.
  FASTATTN_HD void key_tiles(int m0, int BM, int BN, int& first, int& count) const {
    int hi = m0 + BM + hi_off;
    hi = hi < kv_len ? hi : kv_len;
    hi = hi > 0 ? hi : 0;
    const int lo = m0 + lo_off > 0 ? m0 + lo_off : 0;
    first = lo / BN;
    count = (hi + BN - 1) / BN - first;
    count = count > 0 ? count : 0;
  }

  // dK/dV, as Triton's _query_range: the BM-row query tiles m_begin + t·BM, t < count, that a block of keys
  // [n0, n0 + BN) visits: rows i >= n0 − shift − right (m_begin, rounded down to a tile) up to
  // i < min(n0 + BN − shift + left, q_len); none for a block of padding keys (n0 >= kv_len).
  FASTATTN_HD void query_tiles(int n0, int BN, int BM, int& m_begin, int& count) const {
    m_begin = n0 - hi_off > 0 ? (n0 - hi_off) / BM * BM : 0;
    int m_end = n0 + BN - lo_off;
    m_end = m_end > 0 ? m_end : 0;
    m_end = m_end < q_len ? m_end : q_len;
    count = (n0 < kv_len && m_begin < m_end) ? (m_end - m_begin + BM - 1) / BM : 0;
  }
};

// The instructions Triton's kernels use on NVIDIA GPUs for an fp32 `/` (div.full.f32: full range, at most 2 ulp,
// no slow path) and for tl.exp (x·log2(e), then ex2.approx.f32), so that the soft cap rounds as theirs does; on
// the host (tests) plain IEEE division and exp, as Triton's interpreter.
FASTATTN_HD float div_full(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

FASTATTN_HD float exp_approx(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
#else
  return std::exp(x);
#endif
}

// The soft cap's tanh of x = (scale·q·k) / c and its derivative 1 − tanh²(x), formed as the Triton kernels'
// _scores: with a = |x| and u = 2 / (exp(2a) + 1), tanh(a) = 1 − u and 1 − tanh² = u (2 − u), which keeps its
// relative precision where tanh → ±1 (exp(2a) = inf gives exactly ±1 and a derivative of 0); below |x| = 0.3,
// where 1 − u cancels, tanh's Taylor series to x¹¹ (next term < 1e-9 relative).
FASTATTN_HD float softcap_tanh(float x, float& dtanh) {
  const float u = div_full(2.f, exp_approx(2.f * fabsf(x)) + 1.f);
  const float x2 = x * x;
  constexpr float c3 = static_cast<float>(-1.0 / 3), c5 = static_cast<float>(2.0 / 15);
  constexpr float c7 = static_cast<float>(-17.0 / 315), c9 = static_cast<float>(62.0 / 2835);
  constexpr float c11 = static_cast<float>(-1382.0 / 155925);
  const float series = x * (1.f + x2 * (c3 + x2 * (c5 + x2 * (c7 + x2 * (c9 + x2 * c11)))));
  dtanh = u * (2.f - u);
  return x2 < 0.09f ? series : copysignf(1.f - u, x);  // u − 1 for x < 0
}

}  // namespace fastattn
