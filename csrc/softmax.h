// Softmax over the last dim of [rows, cols] row-major tensors, forward and backward, fp32 accumulation.
//
//     z = x·scale + mask,   y = exp(z − max z) / Σ exp(z − max z)   (a row of −inf gives y = 0, not NaN)
//     dz = y ⊙ (dy − Σ y·dy),   dx = scale·dz,   dmask = dz (summed over the mask's broadcast dims by the caller)
//
// No torch, no CUDA headers: `stream` is a cudaStream_t passed as void*. Each function returns nullptr on
// success, else a message (bad argument, or the CUDA error of the launch).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastattn {

struct SoftmaxFwdParams {
  int x_dtype = kRowFloat16, y_dtype = kRowFloat16, mask_dtype = kRowFloat32;  // RowDType codes
  const void* x = nullptr;  // [rows, cols] contiguous
  void* y = nullptr;        // [rows, cols] contiguous
  // Optional additive mask. Row r is (i0, i1, i2) of a [D0, D1, D2] grid (r = (i0·D1 + i1)·D2 + i2) and reads
  // the mask row at i0·mask_s0 + i1·mask_s1 + i2·mask_s2 (elements; 0 on broadcast dims), columns with stride 1.
  const void* mask = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t lead1 = 1, lead2 = 1;  // D1, D2
  int64_t mask_s0 = 0, mask_s1 = 0, mask_s2 = 0;
  float scale = 1.f;
};

struct SoftmaxBwdParams {
  int y_dtype = kRowFloat16, dx_dtype = kRowFloat16;  // dy has y's dtype
  const void* y = nullptr;   // [rows, cols] contiguous
  const void* dy = nullptr;  // [rows, cols] contiguous
  void* dx = nullptr;        // [rows, cols] contiguous
  float* dz = nullptr;       // optional fp32 [rows, cols]: the gradient of z (for a mask gradient)
  int64_t rows = 0, cols = 0;
  float scale = 1.f;
};

const char* softmax_fwd(const SoftmaxFwdParams& p, void* stream);
const char* softmax_bwd(const SoftmaxBwdParams& p, void* stream);

}  // namespace fastattn
