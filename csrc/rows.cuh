// Private building blocks of the row kernels (softmax.cu, layer_norm.cu): conversions, 16-byte vector loads
// with a scalar fallback, team reductions, launch shapes and error reporting. CUDA only, no torch.
//
// A row is processed by a *team*: one warp (blockDim = (32, kRowsPerWarpBlock), a row per warp) for narrow
// rows, or the whole block (blockDim = (32·w, 1)) for wide ones. A thread owns packs j = tid, tid + T, … of
// V consecutive columns (V·sizeof(T) = 16 bytes); a row whose pointers are all 16-byte aligned is read with
// vector accesses, any other row (odd widths, offset views) element by element.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "dtype.h"
#include "launch.h"

namespace fastattn {
namespace rows {

constexpr int kCache = 4;             // packs per thread held in registers; wider rows are re-read
constexpr int kMaxTeam = 512;         // threads of a block team (register budget: 128 per thread)
constexpr int kRowsPerWarpBlock = 4;  // warp teams per block

// ------------------------------------------------------------------------------------------------ dtypes
template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the element type of `code`; an unknown code is an error naming `what`.
template <typename F>
const char* with_dtype(int code, const char* what, F&& f) {
  switch (code) {
    case kRowFloat16: return f(Tag<__half>{});
    case kRowBFloat16: return f(Tag<__nv_bfloat16>{});
    case kRowFloat32: return f(Tag<float>{});
    default: return fail(std::string(what) + ": unknown dtype code " + std::to_string(code) +
                         " (0 = float16, 1 = bfloat16, 2 = float32)");
  }
}

// f(Tag<A>{}, Tag<B>{}) for the element types of codes a and b.
template <typename F>
const char* with_dtypes(int a, const char* what_a, int b, const char* what_b, F&& f) {
  return with_dtype(a, what_a, [&](auto ta) { return with_dtype(b, what_b, [&](auto tb) { return f(ta, tb); }); });
}

inline bool valid_dtype(int code) { return code == kRowFloat16 || code == kRowBFloat16 || code == kRowFloat32; }
inline int dtype_size(int code) { return code == kRowFloat32 ? 4 : 2; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ------------------------------------------------------------------------------------------------ packs
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The raw chunks of a whole pack of V elements of T (8, 16 or 32 bytes). Elements and chunks trade bytes
// through memcpy (registers only after optimisation): reading one type through a pointer to another is
// undefined behaviour that a host compiler does miscompile (the CPU emulator's build showed it).
template <typename T, int V>
struct Raw {
  static constexpr int kBytes = V * int(sizeof(T));
  static_assert(kBytes % 8 == 0, "a pack is a whole number of 8-byte chunks");
  using Chunk = std::conditional_t<kBytes % 16 == 0, uint4, uint2>;
  static constexpr int kChunks = kBytes / int(sizeof(Chunk));
  Chunk c[kChunks];
};

// Whether the pack at p (columns c .. c + V of n) moves as whole vectors: `vec` and inside the row. The emulator
// also checks the alignment `vec` promises (a host CPU reads a misaligned vector, the GPU faults); the fault is
// raised and the pack moves element by element.
template <typename T, int V>
__device__ __forceinline__ bool whole_pack(const T* p, int64_t c, int64_t n, bool vec, const char* what) {
  const bool whole = vec && c + V <= n;
#if defined(FASTATTN_EMULATE)
  if (whole && !fastattn_emu::aligned_vector(p, sizeof(typename Raw<T, V>::Chunk), what)) return false;
#else
  (void)p;
  (void)what;
#endif
  return whole;
}

// out[i] = row[c + i] as float for the V columns from c; columns >= n read as `other`. `vec`: the row
// pointer is 16-byte aligned, so a whole pack is one (or two) vector loads.
template <typename T, int V>
__device__ __forceinline__ void load(const T* row, int64_t c, int64_t n, bool vec, float (&out)[V], float other) {
  if (whole_pack<T, V>(row + c, c, n, vec, "vector load")) {
    Raw<T, V> raw;
    const auto* src = reinterpret_cast<const typename Raw<T, V>::Chunk*>(row + c);
#pragma unroll
    for (int i = 0; i < Raw<T, V>::kChunks; ++i) raw.c[i] = src[i];
    T v[V];
    memcpy(v, raw.c, sizeof(v));
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = c + i < n ? to_float(row[c + i]) : other;
  }
}

// load() for a row whose element type is only known at run time (masks, LayerNorm weight and bias).
template <int V>
__device__ __forceinline__ void load_dyn(const void* row, int dtype, int64_t c, int64_t n, bool vec,
                                         float (&out)[V], float other) {
  switch (dtype) {
    case kRowFloat32: load<float, V>(static_cast<const float*>(row), c, n, vec, out, other); break;
    case kRowBFloat16: load<__nv_bfloat16, V>(static_cast<const __nv_bfloat16*>(row), c, n, vec, out, other); break;
    default: load<__half, V>(static_cast<const __half*>(row), c, n, vec, out, other); break;
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* row, int64_t c, int64_t n, bool vec, const float (&in)[V]) {
  if (whole_pack<T, V>(row + c, c, n, vec, "vector store")) {
    T v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = from_float<T>(in[i]);
    Raw<T, V> raw;
    memcpy(raw.c, v, sizeof(v));
    auto* dst = reinterpret_cast<typename Raw<T, V>::Chunk*>(row + c);
#pragma unroll
    for (int i = 0; i < Raw<T, V>::kChunks; ++i) dst[i] = raw.c[i];
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (c + i < n) row[c + i] = from_float<T>(in[i]);
  }
}

// ------------------------------------------------------------------------------------------------ reductions
struct Sum {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Butterfly over the warp: every lane ends with the same, bitwise identical value.
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduce over the team (see the top of this file); every thread gets the result. The warps' values are
// combined in a fixed order, so the result is deterministic. Uniform control flow across the team required.
template <typename V, typename Op>
__device__ __forceinline__ V team_reduce(V v, Op op) {
  v = warp_reduce(v, op);
  if (blockDim.x == 32) return v;
  __shared__ V part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with `part`
  if (lane == 0) part[warp] = v;
  __syncthreads();
  V r = part[0];
  for (int i = 1; i < warps; ++i) r = op(r, part[i]);
  return r;
}

// Online-softmax state (running max m, sum l of exp(z − m), l in float or double); merge is commutative, so the
// butterfly is exact.
template <typename L>
__device__ __forceinline__ void merge_max_sum(float& m, L& l, float m2, L l2) {
  const float mn = fmaxf(m, m2);
  const float ms = mn == -INFINITY ? 0.f : mn;  // both empty: keep l = 0 instead of exp(−inf + inf) = NaN
  l = l * L(expf(m - ms)) + l2 * L(expf(m2 - ms));
  m = mn;
}

template <typename L>
__device__ __forceinline__ void team_reduce_max_sum(float& m, L& l) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const L l2 = __shfl_xor_sync(0xffffffffu, l, o);
    merge_max_sum(m, l, m2, l2);
  }
  if (blockDim.x == 32) return;
  __shared__ float part_m[32];
  __shared__ L part_l[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    part_m[warp] = m;
    part_l[warp] = l;
  }
  __syncthreads();
  m = part_m[0];
  l = part_l[0];
  for (int i = 1; i < warps; ++i) merge_max_sum(m, l, part_m[i], part_l[i]);
}

// ------------------------------------------------------------------------------------------------ launch shapes
struct Shape {
  dim3 grid, block;
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads of a block team for a row of `packs` packs: enough to hold it in registers, up to kMaxTeam.
inline int team_threads(int64_t packs) {
  const int64_t t = cdiv(cdiv(packs, kCache), 32) * 32;
  return int(t < 32 ? 32 : t > kMaxTeam ? kMaxTeam : t);
}

// One team per row: a warp per row while a warp can hold the row in registers, else a block per row.
inline Shape row_shape(int64_t rows, int64_t packs) {
  if (packs <= 32 * kCache)
    return {dim3(unsigned(cdiv(rows, kRowsPerWarpBlock))), dim3(32, kRowsPerWarpBlock)};
  return {dim3(unsigned(rows)), dim3(team_threads(packs))};
}

// Where this thread stands in a row_shape() launch with packs of V elements: its team's row, the row's width
// in elements (n) and packs, its index in the team (tid) and the team's size.
template <int V>
struct RowTeam {
  int64_t row, n, packs;
  int tid, size;
  __device__ __forceinline__ explicit RowTeam(int64_t cols)
      : row(int64_t(blockIdx.x) * blockDim.y + threadIdx.y), n(cols), packs((cols + V - 1) / V),
        tid(int(threadIdx.x)), size(int(blockDim.x)) {}
  // The row fits in the team's registers (kCache packs per thread).
  __device__ __forceinline__ bool cached() const { return packs <= int64_t(size) * kCache; }
  // Pack k of this thread in the cached layout.
  __device__ __forceinline__ int64_t pack(int k) const { return tid + int64_t(k) * size; }
};

// kernel<<<row_shape(...)>>>(p) for rows of p.cols elements in packs of V; the launch error, if any.
template <int V, typename P>
const char* launch_rows(void (*kernel)(P), const P& p, void* stream, const char* what) {
  const Shape sh = row_shape(p.rows, cdiv(p.cols, V));
  FASTATTN_LAUNCH(kernel, sh.grid, sh.block, 0, static_cast<cudaStream_t>(stream), p);
  return launch_error(what);
}

// Checks shared by every entry point; nullptr when fine.
inline const char* check_rows(const char* op, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 1 || rows > INT32_MAX)
    return fail(std::string(op) + ": bad problem size rows=" + std::to_string(rows) +
                " cols=" + std::to_string(cols));
  return nullptr;
}

}  // namespace rows
}  // namespace fastattn
