// Softmax forward and backward (see softmax.h). One team (warp or block, rows.cuh) per row: a row that fits
// in the team's registers is read once; a wider one is read twice (online max/sum, then the output).
#include "rows.cuh"
#include "softmax.h"

namespace fastattn {
namespace {

using namespace rows;

// z for the pack at column c: x·scale + mask, −inf outside the row.
template <typename Tx, int V>
__device__ __forceinline__ void load_z(const Tx* x, const void* mask, int mask_dtype, int64_t c, int64_t n,
                                       bool vec, float scale, float (&z)[V]) {
  load<Tx, V>(x, c, n, vec, z, 0.f);
  float m[V];
  if (mask) load_dyn<V>(mask, mask_dtype, c, n, vec, m, 0.f);
#pragma unroll
  for (int i = 0; i < V; ++i) z[i] = c + i < n ? z[i] * scale + (mask ? m[i] : 0.f) : -INFINITY;
}

// The normaliser of fp32 rows is summed in fp64: in fp32 the sum of a row's n terms (one of them near 1 when a
// logit dominates) errs by up to ~log2(n) + n/32 roundings, more than torch's vectorised fp32 sum, the baseline
// of the rule. fp16/bf16 rows keep fp32, far below their own rounding.
template <typename Tx, typename Ty>
__global__ void __launch_bounds__(kMaxTeam, 1) softmax_fwd_kernel(const SoftmaxFwdParams p) {
  constexpr int V = 16 / sizeof(Tx);
  using Acc = std::conditional_t<std::is_same<Tx, float>::value, double, float>;
  const RowTeam<V> t(p.cols);
  if (t.row >= p.rows) return;  // whole warp teams only: block teams have exactly one row per block
  const int64_t row = t.row, n = t.n;
  const Tx* x = static_cast<const Tx*>(p.x) + row * n;
  Ty* y = static_cast<Ty*>(p.y) + row * n;
  const char* mask = nullptr;
  if (p.mask) {
    const int64_t i2 = row % p.lead2, i1 = (row / p.lead2) % p.lead1, i0 = row / (p.lead1 * p.lead2);
    mask = static_cast<const char*>(p.mask) +
           (i0 * p.mask_s0 + i1 * p.mask_s1 + i2 * p.mask_s2) * (p.mask_dtype == kRowFloat32 ? 4 : 2);
  }
  const bool vec = aligned16(x) && aligned16(y) && (!mask || aligned16(mask));

  if (t.cached()) {  // the row in registers
    float z[kCache][V];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) {
        load_z<Tx, V>(x, mask, p.mask_dtype, j * V, n, vec, p.scale, z[k]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) z[k][i] = -INFINITY;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) m = fmaxf(m, z[k][i]);
    }
    m = team_reduce(m, Max());
    const float ms = m == -INFINITY ? 0.f : m;  // a −inf row: e = 0, l = 0, y = 0
    Acc l = 0;
#pragma unroll
    for (int k = 0; k < kCache; ++k)
#pragma unroll
      for (int i = 0; i < V; ++i) {
        z[k][i] = expf(z[k][i] - ms);
        l += z[k][i];
      }
    l = team_reduce(l, Sum());
    const float denom = l == 0 ? 1.f : static_cast<float>(l);
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) {
#pragma unroll
        for (int i = 0; i < V; ++i) z[k][i] = z[k][i] / denom;
        store<Ty, V>(y, j * V, n, vec, z[k]);
      }
    }
    return;
  }

  // Wide rows: per-thread running max and sum, merged over the team, then a second read for the output.
  float m = -INFINITY;
  Acc l = 0;
  for (int64_t j = t.tid; j < t.packs; j += t.size) {
    float z[V];
    load_z<Tx, V>(x, mask, p.mask_dtype, j * V, n, vec, p.scale, z);
    float pm = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i) pm = fmaxf(pm, z[i]);
    const float mn = fmaxf(m, pm), ms = mn == -INFINITY ? 0.f : mn;
    Acc e = 0;
#pragma unroll
    for (int i = 0; i < V; ++i) e += expf(z[i] - ms);
    l = l * Acc(expf(m - ms)) + e;
    m = mn;
  }
  team_reduce_max_sum(m, l);
  const float ms = m == -INFINITY ? 0.f : m, denom = l == 0 ? 1.f : static_cast<float>(l);
  for (int64_t j = t.tid; j < t.packs; j += t.size) {
    float z[V];
    load_z<Tx, V>(x, mask, p.mask_dtype, j * V, n, vec, p.scale, z);
#pragma unroll
    for (int i = 0; i < V; ++i) z[i] = expf(z[i] - ms) / denom;
    store<Ty, V>(y, j * V, n, vec, z);
  }
}

// For fp32 rows the dot Σ y·dy is summed, and dy − dot (which cancels where one y dominates) formed, in fp64, as
// the forward's normaliser is (in fp32 dx and the mask gradient, a sum of dz over rows, reached 2.3 and 3.1 times
// the rule's bound at widths 256–1000; CPU emulator).
template <typename Ty, typename Tdx>
__global__ void __launch_bounds__(kMaxTeam, 1) softmax_bwd_kernel(const SoftmaxBwdParams p) {
  constexpr int V = 16 / sizeof(Ty);
  using Acc = std::conditional_t<std::is_same<Ty, float>::value, double, float>;
  const RowTeam<V> t(p.cols);
  if (t.row >= p.rows) return;
  const int64_t row = t.row, n = t.n;
  const Ty* y = static_cast<const Ty*>(p.y) + row * n;
  const Ty* dy = static_cast<const Ty*>(p.dy) + row * n;
  Tdx* dx = static_cast<Tdx*>(p.dx) + row * n;
  float* dz = p.dz ? p.dz + row * n : nullptr;
  const bool vec = aligned16(y) && aligned16(dy) && aligned16(dx) && (!dz || aligned16(dz));

  // dz = y·(dy − Σ y·dy) for one pack, written as dx = scale·dz (and dz itself when asked for).
  auto emit = [&](int64_t c, const float (&yv)[V], const float (&dyv)[V], Acc dot) {
    float d[V], s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      d[i] = static_cast<float>(Acc(yv[i]) * (Acc(dyv[i]) - dot));
      s[i] = d[i] * p.scale;
    }
    store<Tdx, V>(dx, c, n, vec, s);
    if (dz) store<float, V>(dz, c, n, vec, d);
  };

  if (t.cached()) {
    float yv[kCache][V], dyv[kCache][V];
    Acc dot = 0;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) {
        load<Ty, V>(y, j * V, n, vec, yv[k], 0.f);
        load<Ty, V>(dy, j * V, n, vec, dyv[k], 0.f);
#pragma unroll
        for (int i = 0; i < V; ++i) dot += Acc(yv[k][i]) * Acc(dyv[k][i]);
      }
    }
    const Acc total = team_reduce(dot, Sum());
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) emit(j * V, yv[k], dyv[k], total);
    }
    return;
  }

  Acc dot = 0;
  for (int64_t j = t.tid; j < t.packs; j += t.size) {
    float yv[V], dyv[V];
    load<Ty, V>(y, j * V, n, vec, yv, 0.f);
    load<Ty, V>(dy, j * V, n, vec, dyv, 0.f);
#pragma unroll
    for (int i = 0; i < V; ++i) dot += Acc(yv[i]) * Acc(dyv[i]);
  }
  const Acc total = team_reduce(dot, Sum());
  for (int64_t j = t.tid; j < t.packs; j += t.size) {
    float yv[V], dyv[V];
    load<Ty, V>(y, j * V, n, vec, yv, 0.f);
    load<Ty, V>(dy, j * V, n, vec, dyv, 0.f);
    emit(j * V, yv, dyv, total);
  }
}

}  // namespace

const char* softmax_fwd(const SoftmaxFwdParams& p, void* stream) {
  if (const char* e = check_rows("softmax_fwd", p.rows, p.cols)) return e;
  if (!p.x || !p.y) return fail("softmax_fwd: x and y are required");
  if (p.mask && !valid_dtype(p.mask_dtype)) return fail("softmax_fwd: unknown mask dtype code");
  if (p.mask && (p.lead1 < 1 || p.lead2 < 1 || p.rows % (p.lead1 * p.lead2) != 0))
    return fail("softmax_fwd: lead1 * lead2 must divide rows");
  if (p.rows == 0) return nullptr;
  return with_dtypes(p.x_dtype, "softmax_fwd x", p.y_dtype, "softmax_fwd y", [&](auto tx, auto ty) {
    using Tx = typename decltype(tx)::type;
    return launch_rows<16 / sizeof(Tx)>(softmax_fwd_kernel<Tx, typename decltype(ty)::type>, p, stream,
                                        "softmax_fwd launch");
  });
}

const char* softmax_bwd(const SoftmaxBwdParams& p, void* stream) {
  if (const char* e = check_rows("softmax_bwd", p.rows, p.cols)) return e;
  if (!p.y || !p.dy || !p.dx) return fail("softmax_bwd: y, dy and dx are required");
  if (p.rows == 0) return nullptr;
  return with_dtypes(p.y_dtype, "softmax_bwd y", p.dx_dtype, "softmax_bwd dx", [&](auto ty, auto tdx) {
    using Ty = typename decltype(ty)::type;
    return launch_rows<16 / sizeof(Ty)>(softmax_bwd_kernel<Ty, typename decltype(tdx)::type>, p, stream,
                                        "softmax_bwd launch");
  });
}

}  // namespace fastattn
