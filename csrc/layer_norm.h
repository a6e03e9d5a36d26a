// LayerNorm (optionally of x + residual) over the last dim of [rows, cols] rows, forward and backward.
//
//     s = x (+ residual, rounded to x's dtype as torch's add is),  μ = mean(s),  rstd = 1/sqrt(mean((s−μ)²) + eps)
//     ŝ = (s − μ)·rstd,  y = ŝ·w + b
//     backward: g = dy·w,  ds = rstd·(g − mean(g) − ŝ·mean(g·ŝ)) (+ dsum for prenorm),
//               dw = Σ_rows dy·ŝ,  db = Σ_rows dy
//
// The backward runs `partials` blocks; block p takes rows p, p + partials, … and writes its own fp32 partial
// row of dw and db (dw_partial[p, :], db_partial[p, :], zero-filled by the caller); the caller sums the
// partial rows in a fixed order. No atomics: reruns are bitwise identical.
//
// No torch, no CUDA headers: `stream` is a cudaStream_t passed as void*. Each function returns nullptr on
// success, else a message (bad argument, or the CUDA error of the launch).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastattn {

struct LayerNormFwdParams {
  int dtype = kRowFloat16;                                // x, residual, y, s (RowDType code)
  int w_dtype = kRowFloat32, b_dtype = kRowFloat32;       // weight, bias (may differ from x's)
  const void* x = nullptr;         // [rows, cols] contiguous
  const void* residual = nullptr;  // optional [rows, cols] contiguous; then s = x + residual is stored
  const void* w = nullptr;         // optional [cols]
  const void* b = nullptr;         // optional [cols]
  void* y = nullptr;               // [rows, cols]
  void* s = nullptr;               // [rows, cols], required with residual
  float* mean = nullptr;           // [rows]
  float* rstd = nullptr;           // [rows]
  int64_t rows = 0, cols = 0;
  float eps = 1e-5f;
};

struct LayerNormBwdParams {
  int dtype = kRowFloat16;      // s, dy, dsum, dx
  int w_dtype = kRowFloat32;
  const void* s = nullptr;      // [rows, cols]: the normalised input (x, or x + residual)
  const void* w = nullptr;      // optional [cols]
  const void* dy = nullptr;     // [rows, cols]
  const void* dsum = nullptr;   // optional [rows, cols]: gradient of the returned s (prenorm), added to dx
  void* dx = nullptr;           // [rows, cols]
  const float* mean = nullptr;  // [rows]
  const float* rstd = nullptr;  // [rows]
  float* dw_partial = nullptr;  // optional fp32 [partials, cols] (both or neither)
  float* db_partial = nullptr;  // optional fp32 [partials, cols]
  int64_t rows = 0, cols = 0;
  int partials = 1;             // number of blocks (and partial rows)
};

const char* layer_norm_fwd(const LayerNormFwdParams& p, void* stream);
const char* layer_norm_bwd(const LayerNormBwdParams& p, void* stream);

// Threads per block of layer_norm_bwd for rows of `cols` elements of `dtype` (for choosing `partials`).
int layer_norm_bwd_threads(int dtype, int64_t cols);

}  // namespace fastattn
