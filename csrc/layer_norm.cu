// LayerNorm forward and backward (see layer_norm.h).
// Forward: one team (warp or block, rows.cuh) per row; a row that fits in registers is read once.
// Backward: `partials` blocks, each looping over its rows with a fixed column-to-thread map, so that each
// thread accumulates dw/db for its own columns (in registers, or in its block's partial row for wide rows).
#include "layer_norm.h"
#include "rows.cuh"

namespace fastattn {
namespace {

using namespace rows;

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
__global__ void __launch_bounds__(kMaxTeam, 1) layer_norm_fwd_kernel(const LayerNormFwdParams p) {
  constexpr int V = 16 / sizeof(T);
  const RowTeam<V> t(p.cols);
  if (t.row >= p.rows) return;  // whole warp teams only: block teams have exactly one row per block
  const int64_t row = t.row, n = t.n;
  const T* x = static_cast<const T*>(p.x) + row * n;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * n : nullptr;
  T* s = res ? static_cast<T*>(p.s) + row * n : nullptr;
  T* y = static_cast<T*>(p.y) + row * n;
  const bool vec = aligned16(x) && aligned16(y) && (!res || (aligned16(res) && aligned16(s))) &&
                   (!p.w || aligned16(p.w)) && (!p.b || aligned16(p.b));

  // s for the pack at column c (x + residual rounded to T, as torch adds, and stored); 0 outside the row.
  auto load_s = [&](int64_t c, float (&v)[V]) {
    load<T, V>(x, c, n, vec, v, 0.f);
    if (res) {
      float r[V];
      load<T, V>(res, c, n, vec, r, 0.f);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = to_float(from_float<T>(v[i] + r[i]));
      store<T, V>(s, c, n, vec, v);
    }
  };
  // y = (s − μ)·rstd·w + b for one pack
  auto emit = [&](int64_t c, float (&v)[V], float mean, float rstd) {
    float w[V], b[V];
    if (p.w) load_dyn<V>(p.w, p.w_dtype, c, n, vec, w, 0.f);
    if (p.b) load_dyn<V>(p.b, p.b_dtype, c, n, vec, b, 0.f);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[i] = (v[i] - mean) * rstd;
      if (p.w) v[i] = v[i] * w[i];
      if (p.b) v[i] = v[i] + b[i];
    }
    store<T, V>(y, c, n, vec, v);
  };

  float mean, rstd;
  if (t.cached()) {  // the row in registers
    float v[kCache][V];
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) {
        load_s(j * V, v[k]);
#pragma unroll
        for (int i = 0; i < V; ++i) acc += v[k][i];
      }
    }
    mean = team_reduce(acc, Sum()) / float(n);
    acc = 0.f;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = j * V + i < n ? v[k][i] - mean : 0.f;
          acc += d * d;
        }
      }
    }
    rstd = 1.f / sqrtf(team_reduce(acc, Sum()) / float(n) + p.eps);
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) emit(j * V, v[k], mean, rstd);
    }
  } else {  // wide rows: sum (storing s), sum of squares, output; each pass re-reads the row
    const T* src = res ? s : x;
    float acc = 0.f;
    for (int64_t j = t.tid; j < t.packs; j += t.size) {
      float v[V];
      load_s(j * V, v);
#pragma unroll
      for (int i = 0; i < V; ++i) acc += v[i];
    }
    mean = team_reduce(acc, Sum()) / float(n);
    acc = 0.f;
    for (int64_t j = t.tid; j < t.packs; j += t.size) {
      float v[V];
      load<T, V>(src, j * V, n, vec, v, 0.f);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = j * V + i < n ? v[i] - mean : 0.f;
        acc += d * d;
      }
    }
    rstd = 1.f / sqrtf(team_reduce(acc, Sum()) / float(n) + p.eps);
    for (int64_t j = t.tid; j < t.packs; j += t.size) {
      float v[V];
      load<T, V>(src, j * V, n, vec, v, 0.f);
      emit(j * V, v, mean, rstd);
    }
  }
  if (t.tid == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// ------------------------------------------------------------------------------------------------ backward
template <typename T>
__global__ void __launch_bounds__(kMaxTeam, 1) layer_norm_bwd_kernel(const LayerNormBwdParams p) {
  constexpr int V = 16 / sizeof(T);
  const RowTeam<V> t(p.cols);  // a block per team; its rows are blockIdx.x, blockIdx.x + gridDim.x, ...
  const int64_t n = t.n;
  const bool wb = p.dw_partial != nullptr;
  float* dwp = wb ? p.dw_partial + int64_t(blockIdx.x) * n : nullptr;
  float* dbp = wb ? p.db_partial + int64_t(blockIdx.x) * n : nullptr;
  const bool cached = t.cached();  // dw/db of this thread's columns fit in registers
  const bool vec_p = !wb || (aligned16(dwp) && aligned16(dbp));

  float dw[kCache][V], db[kCache][V];
#pragma unroll
  for (int k = 0; k < kCache; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = 0.f;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* s = static_cast<const T*>(p.s) + row * n;
    const T* dy = static_cast<const T*>(p.dy) + row * n;
    const T* dsum = p.dsum ? static_cast<const T*>(p.dsum) + row * n : nullptr;
    T* dx = static_cast<T*>(p.dx) + row * n;
    const bool vec = aligned16(s) && aligned16(dy) && aligned16(dx) && (!dsum || aligned16(dsum)) &&
                     (!p.w || aligned16(p.w));
    const float mean = p.mean[row], rstd = p.rstd[row];

    // ŝ, dy and g = dy·w of the pack at column c (0 outside the row)
    auto load_pack = [&](int64_t c, float (&xh)[V], float (&d)[V], float (&g)[V]) {
      load<T, V>(s, c, n, vec, xh, 0.f);
      load<T, V>(dy, c, n, vec, d, 0.f);
      if (p.w) load_dyn<V>(p.w, p.w_dtype, c, n, vec, g, 0.f);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        xh[i] = c + i < n ? (xh[i] - mean) * rstd : 0.f;
        g[i] = p.w ? d[i] * g[i] : d[i];
      }
    };

    float sg = 0.f, sgx = 0.f;
    for (int64_t j = t.tid; j < t.packs; j += t.size) {
      float xh[V], d[V], g[V];
      load_pack(j * V, xh, d, g);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sg += g[i];
        sgx += g[i] * xh[i];
      }
    }
    const float c_g = team_reduce(sg, Sum()) / float(n), c_gx = team_reduce(sgx, Sum()) / float(n);

    // The second read of the row (from L1/L2): dx, and dw/db of this thread's columns.
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      for (int64_t j = t.pack(k); j < t.packs; j += int64_t(t.size) * kCache) {
        const int64_t c = j * V;
        float xh[V], d[V], g[V], out[V];
        load_pack(c, xh, d, g);
        if (dsum) load<T, V>(dsum, c, n, vec, out, 0.f);
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = (g[i] - c_g - xh[i] * c_gx) * rstd + (dsum ? out[i] : 0.f);
        store<T, V>(dx, c, n, vec, out);
        if (!wb) continue;
        if (cached) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            dw[k][i] += d[i] * xh[i];
            db[k][i] += d[i];
          }
        } else {  // this block's own partial row; each column has one owner thread, so no race
          float pw[V], pb[V];
          load<float, V>(dwp, c, n, vec_p, pw, 0.f);
          load<float, V>(dbp, c, n, vec_p, pb, 0.f);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            pw[i] += d[i] * xh[i];
            pb[i] += d[i];
          }
          store<float, V>(dwp, c, n, vec_p, pw);
          store<float, V>(dbp, c, n, vec_p, pb);
        }
      }
    }
  }
  if (wb && cached) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = t.pack(k);
      if (j < t.packs) {
        store<float, V>(dwp, j * V, n, vec_p, dw[k]);
        store<float, V>(dbp, j * V, n, vec_p, db[k]);
      }
    }
  }
}

}  // namespace

const char* layer_norm_fwd(const LayerNormFwdParams& p, void* stream) {
  if (const char* e = check_rows("layer_norm_fwd", p.rows, p.cols)) return e;
  if (!p.x || !p.y || !p.mean || !p.rstd) return fail("layer_norm_fwd: x, y, mean and rstd are required");
  if (p.residual && !p.s) return fail("layer_norm_fwd: s is required with a residual");
  if ((p.w && !valid_dtype(p.w_dtype)) || (p.b && !valid_dtype(p.b_dtype)))
    return fail("layer_norm_fwd: unknown weight or bias dtype code");
  if (p.rows == 0) return nullptr;
  return with_dtype(p.dtype, "layer_norm_fwd x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_rows<16 / sizeof(T)>(layer_norm_fwd_kernel<T>, p, stream, "layer_norm_fwd launch");
  });
}

int layer_norm_bwd_threads(int dtype, int64_t cols) {
  return rows::team_threads(rows::cdiv(cols, 16 / rows::dtype_size(dtype)));
}

const char* layer_norm_bwd(const LayerNormBwdParams& p, void* stream) {
  if (const char* e = check_rows("layer_norm_bwd", p.rows, p.cols)) return e;
  if (!p.s || !p.dy || !p.dx || !p.mean || !p.rstd)
    return fail("layer_norm_bwd: s, dy, dx, mean and rstd are required");
  if (!p.dw_partial != !p.db_partial) return fail("layer_norm_bwd: give both dw_partial and db_partial or neither");
  if (p.w && !valid_dtype(p.w_dtype)) return fail("layer_norm_bwd: unknown weight dtype code");
  if (p.partials < 1) return fail("layer_norm_bwd: partials must be >= 1");
  if (p.rows == 0) return nullptr;
  return with_dtype(p.dtype, "layer_norm_bwd s", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const unsigned threads = layer_norm_bwd_threads(p.dtype, p.cols);
    FASTATTN_LAUNCH(layer_norm_bwd_kernel<T>, p.partials, threads, 0, static_cast<cudaStream_t>(stream), p);
    return launch_error("layer_norm_bwd launch");
  });
}

}  // namespace fastattn
