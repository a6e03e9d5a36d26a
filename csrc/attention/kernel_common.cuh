// Private helpers of the attention kernels (fwd_kernels.cuh, bwd_kernels.cuh): inline PTX for tensor-core MMA
// (m16n8k16, fp32 accumulation), ldmatrix and cp.async, warp-level GEMMs on 16-row tiles, score masking, and host
// launch checks.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), two 16-bit values per 32-bit register, the lower
// column (A, C) or lower k (B) in the low half:
//   A 16x16 row-major: a[0] = (row g, cols 2t..2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 2t+8..),
//                      a[3] = (row g+8, cols 2t+8..)
//   B 16x8  (k x n):   b[0] = (k 2t..2t+1, col g), b[1] = (k 2t+8..2t+9, col g)
//   C 16x8  fp32:      c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (row g+8, cols 2t, 2t+1)
// Shared-memory tiles are row-major with a row pitch of D + 8 elements (16 bytes of padding): the 8 row addresses
// of every ldmatrix 8x8 matrix then fall in 8 different 16-byte bank groups (no bank conflicts), and every row
// start stays 16-byte aligned for cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "../launch.h"
#include "local.h"
#include "params.h"
#include "philox.h"

namespace fastattn {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------- element types
template <typename T> struct Elem;

template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);  // not through a uint32_t pointer: that is undefined behaviour (see rows.cuh)
    return r;
  }
};

template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);  // not through a uint32_t pointer: that is undefined behaviour (see rows.cuh)
    return r;
  }
};

// ------------------------------------------------------------------------------------------- inline PTX
#if !defined(FASTATTN_EMULATE)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// d += a · b (16x8x16), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTATTN_EMULATE)
  fastattn_emu::mma_m16n8k16<__half>(d, a, b0, b1);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(FASTATTN_EMULATE)
  fastattn_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#if defined(FASTATTN_EMULATE)
  fastattn_emu::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(FASTATTN_EMULATE)
  fastattn_emu::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t n = valid ? 16u : 0u;
#if defined(FASTATTN_EMULATE)
  fastattn_emu::cp_async_16(dst, src, n);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTATTN_EMULATE)
  fastattn_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTATTN_EMULATE)
  fastattn_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ------------------------------------------------------------------------------------------- tiles
// Rows [row0, row0 + ROWS) of a global matrix, row r at g + offset(r) elements (last dim contiguous), into a
// shared tile of pitch D + 8; rows >= nvalid are zero-filled (never read), so padding (even NaN) cannot reach the
// MMAs.
template <typename T, int ROWS, int D, int NTHREADS, typename Offset>
__device__ __forceinline__ void load_rows_async(T* s, const T* g, Offset offset, int row0, int nvalid, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kPitch = D + 8;
#pragma unroll
  for (int it = 0; it < (ROWS * kChunks + NTHREADS - 1) / NTHREADS; ++it) {
    const int c = tid + it * NTHREADS;
    if (ROWS * kChunks % NTHREADS != 0 && c >= ROWS * kChunks) break;
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    const int gr = row0 + r;
    const bool ok = gr < nvalid;
    const T* src = ok ? g + offset(gr) + col : g;
    cp_async_16(s + r * kPitch + col, src, ok);
  }
}

// The same for a [*, D] matrix of row stride ld elements.
template <typename T, int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t ld, int row0, int nvalid, int tid) {
  load_rows_async<T, ROWS, D, NTHREADS>(s, g, [ld](int r) { return r * ld; }, row0, nvalid, tid);
}

// A operand (16x16) at (row0, k0) of a row-major shared tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int pitch, int row0, int k0, int lane) {
  const int mi = lane >> 3, r = lane & 7;
  ldsm_x4(a, s + (row0 + r + (mi & 1) * 8) * pitch + k0 + (mi >> 1) * 8);
}

// B operands of two n-tiles (n0, n0 + 8) at k0, from a shared tile stored [n][k] (e.g. K for Q·Kᵀ):
// b[0], b[1] for n-tile n0; b[2], b[3] for n-tile n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* s, int pitch, int n0, int k0, int lane) {
  const int mi = lane >> 3, r = lane & 7;
  ldsm_x4(b, s + (n0 + r + (mi >> 1) * 8) * pitch + k0 + (mi & 1) * 8);
}

// Same, from a shared tile stored [k][n] (e.g. V for P·V), through ldmatrix.trans.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* s, int pitch, int k0, int n0, int lane) {
  const int mi = lane >> 3, r = lane & 7;
  ldsm_x4_trans(b, s + (k0 + r + (mi & 1) * 8) * pitch + n0 + (mi >> 1) * 8);
}

// acc[16 x 8NT] += A[rows arow0.., K] · Bᵀ, A row-major in shared, B stored [n][k] in shared (n from bn0).
template <typename T, int NT, int K>
__device__ __forceinline__ void gemm_ss(float (&acc)[NT][4], const T* sA, int pitch_a, int arow0, const T* sB,
                                        int pitch_b, int bn0, int lane) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tile shape");
  // Fully unrolled, the K = 128 and 256 loops hoist so many ldmatrix results that the backward kernels spill.
  constexpr int kUnroll = K >= 256 ? 2 : (K >= 128 ? 4 : K / 16);
#pragma unroll kUnroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a(a, sA, pitch_a, arow0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_nk(b, sB, pitch_b, bn0 + np * 16, kk * 16, lane);
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x 8NT] += A · B, A in registers (K/16 fragments), B stored [k][n] in shared (k from 0, n from bn0).
template <typename T, int NT, int K>
__device__ __forceinline__ void gemm_rs(float (&acc)[NT][4], const uint32_t (&a)[K / 16][4], const T* sB,
                                        int pitch_b, int bn0, int lane) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_kn(b, sB, pitch_b, kk * 16, bn0 + np * 16, lane);
      mma16816<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// A fragments (16 x 8NT, rounded to T) of a 16 x 8NT fp32 C tile: the C tile of one MMA feeds the next.
template <typename T, int NT>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = Elem<T>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = Elem<T>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = Elem<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = Elem<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// Two adjacent elements of a row: one 4-byte store of the rounded pair, or for fp32 (split-KV partials) 8 bytes.
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = Elem<T>::pack(lo, hi);
}
template <>
__device__ __forceinline__ void store_pair<float>(float* dst, float lo, float hi) {
  *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
}

// store_pair of the pair rounded to T, and of what the rounding dropped (rounded to T) at the same place of lo.
template <typename T>
__device__ __forceinline__ void store_pair_split(T* dst, T* lo, float x0, float x1) {
  const uint32_t hi = Elem<T>::pack(x0, x1);
  T h[2];
  memcpy(h, &hi, 4);
  *reinterpret_cast<uint32_t*>(dst) = hi;
  *reinterpret_cast<uint32_t*>(lo) = Elem<T>::pack(x0 - Elem<T>::to_float(h[0]), x1 - Elem<T>::to_float(h[1]));
}

// store_pair at g + at and, with lo (fp16/bf16 T), what the rounding dropped at lo + at (store_pair_split).
template <typename T>
__device__ __forceinline__ void store_out_pair(T* g, T* lo, int64_t at, float x0, float x1) {
  if constexpr (!std::is_same_v<T, float>) {
    if (lo != nullptr) return store_pair_split(g + at, lo + at, x0, x1);
  }
  store_pair(g + at, x0, x1);
}

// Stores rows [row0, row0 + 16) of a warp's 16 x 8NT fp32 C tile, times mul, as T into a global matrix (row r at
// g + offset(r) elements, columns from col0), rows >= nrows skipped. Two adjacent columns per store (store_pair).
// With lo (fp16/bf16 T), also what the rounding dropped, at the same places of lo (store_out_pair).
template <typename T, int NT, typename Offset>
__device__ __forceinline__ void store_rows(T* g, Offset offset, int row0, int col0, int nrows,
                                           const float (&c)[NT][4], float mul0, float mul1, int lane,
                                           T* lo = nullptr) {
  const int gr = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + gr + half * 8;
    if (row >= nrows) continue;
    const float mul = half ? mul1 : mul0;
    const int64_t at = offset(row) + col0 + 2 * tq;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      store_out_pair(g, lo, at + nt * 8, c[nt][2 * half] * mul, c[nt][2 * half + 1] * mul);
  }
}

// The same into a [*, *] matrix of row stride ld.
template <typename T, int NT>
__device__ __forceinline__ void store_c(T* g, int64_t ld, int row0, int col0, int nrows, const float (&c)[NT][4],
                                        float mul0, float mul1, int lane) {
  store_rows<T, NT>(g, [ld](int r) { return r * ld; }, row0, col0, nrows, c, mul0, mul1, lane);
}

// ------------------------------------------------------------------------------------------- masking
// Sequence b of the batch: where its rows start in the (packed) tensors, how many there are, how many keys are
// visible. Not packed: the whole [Lq] / [Lk] of batch b. Packed: rows cu[b] .. cu[b+1], lengths clamped to
// [0, Lq] / [0, Lk] (max_seqlen) so that a bad cu_seqlens can never index outside the grid's extents.
struct Seq {
  int q0 = 0, k0 = 0;  // first query / key row of the sequence (0 unless packed)
  int q_len, k_len;    // its query / key rows
  int kv_len;          // visible keys: min(kv_lens[b], k_len), at least 0

  __device__ __forceinline__ Seq(const AttnParams& p, int b) {
    q_len = p.Lq;
    k_len = p.Lk;
    if (p.cu_seqlens_q != nullptr) {
      q0 = p.cu_seqlens_q[b];
      k0 = p.cu_seqlens_k[b];
      q_len = max(0, min(p.cu_seqlens_q[b + 1] - q0, p.Lq));
      k_len = max(0, min(p.cu_seqlens_k[b + 1] - k0, p.Lk));
    }
    kv_len = p.kv_lens ? max(0, min(p.kv_lens[b], k_len)) : k_len;
  }

  // The sequence's window (local.h): diagonal shift kv_len − q_len when bottom-right, else 0.
  __device__ __forceinline__ Window window(const AttnParams& p) const {
    return Window(p, q_len, kv_len, p.bottom_right ? kv_len - q_len : 0);
  }

  // For a kernel's epilogue: the first row and number of rows of sequence b's queries (KEYS = false) or keys,
  // read again through volatile loads of cu_seqlens (fresh values, not those of the Seq made at the start held in
  // registers across the main loop, which ptxas spills in the largest instances).
  struct Rows {
    int start, len;
  };
  template <bool KEYS>
  __device__ __forceinline__ static Rows reread(const AttnParams& p, int b) {
    const int32_t* cu = KEYS ? p.cu_seqlens_k : p.cu_seqlens_q;
    const int extent = KEYS ? p.Lk : p.Lq;
    if (cu == nullptr) return {0, extent};
    const volatile int32_t* vcu = cu;
    const int start = vcu[b];
    return {start, max(0, min(vcu[b + 1] - start, extent))};
  }

  // Index in lse / dlse of query row 0 of head h: [B, H, Lq] dense, or [H, total_q] packed (q0: the sequence's
  // first query row).
  __device__ __forceinline__ static int64_t lse_row0(const AttnParams& p, int b, int h, int q0) {
    return p.cu_seqlens_q != nullptr ? h * p.total_q + q0 : (static_cast<int64_t>(b) * p.H + h) * p.Lq;
  }
  __device__ __forceinline__ int64_t lse_row0(const AttnParams& p, int b, int h) const {
    return lse_row0(p, b, h, q0);
  }
};

// The forward's grid of query rows and heads (params.h, pack_gqa): Lq·G rows of each of H / G heads, G = 1
// unpacked (also the dQ kernel's: the backward is never packed).
FASTATTN_HD int fwd_rows(const AttnParams& p) { return p.Lq * p.pack_gqa; }
FASTATTN_HD int fwd_heads(const AttnParams& p) { return p.H / p.pack_gqa; }

// r / G for 0 <= r < 2^30 as (r · mul) >> shift (AttnParams::pack_mul, pack_shift; the identity by default).
FASTATTN_HD int div_rows(int r, uint32_t mul, int shift) {
  return static_cast<int>((static_cast<uint64_t>(r) * mul) >> shift);
}

// mul, shift of div_rows for G >= 1: shift = 31 + floor(log2 G), mul = ceil(2^shift / G) < 2^32. Exact: with
// e = mul·G − 2^shift < G < 2^(l + 1), r·mul / 2^shift = r / G + r·e / (G·2^shift), and r·e < 2^(31 + l) = 2^shift
// keeps the error below 1 / G, less than the distance from r / G to the next integer (rows are below 2^28 + BM).
inline void div_rows_magic(int G, uint32_t& mul, int& shift) {
  int l = 0;
  while ((2 << l) <= G) ++l;
  shift = 31 + l;
  mul = static_cast<uint32_t>(((uint64_t{1} << shift) + G - 1) / G);
}

// The query rows of the forward's CTAs (params.h, pack_gqa): with G = p.pack_gqa, row r of a CTA of query head h
// (the first of its kv head's group when packed) is query pos(r) of head h + head(r); G = 1: query r of head h.
struct PackedRows {
  int G;
  uint32_t mul;
  int shift;
  __device__ __forceinline__ explicit PackedRows(const AttnParams& p)
      : G(p.pack_gqa), mul(p.pack_mul), shift(p.pack_shift) {}
  __device__ __forceinline__ PackedRows() : G(1), mul(1u << 31), shift(31) {}  // unpacked (the backward)
  __device__ __forceinline__ int pos(int r) const { return div_rows(r, mul, shift); }
  __device__ __forceinline__ int head(int r) const { return r - pos(r) * G; }
  // Element offset of row r in a (head stride sh, row stride sl) tensor.
  __device__ __forceinline__ int64_t offset(int r, int64_t sh, int64_t sl) const {
    return head(r) * sh + pos(r) * sl;
  }
  // Query positions [first, first + count) of rows [m0, m0 + rows).
  __device__ __forceinline__ void span(int m0, int rows, int& first, int& count) const {
    first = pos(m0);
    count = pos(m0 + rows - 1) - first + 1;
  }
};

enum CapMode : int { kCapOff, kCapOn, kCapPerElement };  // see Scores::modded

// Turns raw dot products q_i·k_j of one (batch, query head) into base-2 scores s_ij·log2(e), −inf where invisible:
//   s_ij = cap(scale·q_i·k_j) − slope·|d(i) − j| + bias_ij,  cap(x) = c·tanh(x / c) (identity without softcap),
// visible by position through the window (local.h: i < Lq, j < kv_len, d(i) − left <= j <= d(i) + right), then
// through the bool mask. Semantics of fastattn/triton/attention.py (_visible, _scores).
template <typename T>
struct Scores {
  int kv_len, shift;
  Window win;
  float scale, scale_log2, softcap, slope_log2;  // softcap 0 = off; slope_log2 = slope·log2(e), 0 without ALiBi
  const T* bias;  // already offset to (b, h); null when absent
  int64_t bias_sm, bias_sn;
  const uint8_t* mask;  // already offset to (b, h); null when absent
  int64_t mask_sm, mask_sn;

  // p has been through prepare(): causal folded into window_right, windows normalised.
  __device__ __forceinline__ Scores(const AttnParams& p, int b, int h, const Seq& seq)
      : kv_len(seq.kv_len),
        shift(p.bottom_right ? seq.kv_len - seq.q_len : 0),
        win(seq.window(p)) {
    scale = p.scale;
    scale_log2 = p.scale * kLog2e;
    softcap = p.softcap;
    slope_log2 = p.alibi ? p.alibi[b * p.alibi_sb + h] * kLog2e : 0.f;
    bias = p.bias ? static_cast<const T*>(p.bias) + b * p.bias_sb + h * p.bias_sh : nullptr;
    bias_sm = p.bias_sm;
    bias_sn = p.bias_sn;
    mask = p.mask ? p.mask + b * p.mask_sb + h * p.mask_sh : nullptr;
    mask_sm = p.mask_sm;
    mask_sn = p.mask_sn;
  }

  // The base-2 score of (query i, key j) before bias and masks, from its dot product q_i·k_j: with MODS (softcap or
  // ALiBi on, a template flag) the soft cap (dcap = its derivative 1 − tanh²) as CAP says (kCapOff, kCapOn,
  // kCapPerElement: when softcap > 0) and ALiBi (slope_log2 = 0 without it: −0·dist changes nothing).
  template <bool MODS, int CAP>
  __device__ __forceinline__ float modded(float dot, int i, int j, float& dcap) const {
    float s;
    dcap = 1.f;
    if (MODS && (CAP == kCapOn || (CAP == kCapPerElement && softcap > 0.f))) {
      // as Triton's _scores: x = scale·q·k, c·tanh(x / c), then the change of base
      s = softcap * softcap_tanh(div_full(dot * scale, softcap), dcap) * kLog2e;
    } else {
      s = dot * scale_log2;
    }
    if constexpr (MODS) s -= slope_log2 * static_cast<float>(abs(i + shift - j));  // ALiBi: −slope·|d(i) − j|
    return s;
  }

  // A warp's 16 x 8NT tile of dot products to scores in place. Rows are queries and columns keys, or the other
  // way round when KEY_ROWS (the dK/dV kernel computes K·Qᵀ); rows from row0 and columns from col0 (global
  // indices; query row r is query div_rows(r, pos_mul, pos_shift): r unless packed, PackedRows). Template flags
  // (each costs registers even when skipped at run time): BIAS_MASK, p.bias or p.mask is set, each read where it
  // is non-null; MODS, softcap or ALiBi is on (see modded()). With the soft cap on and dcap non-null (the
  // backward), the derivative of element (nt, e) goes to dcap[(nt·4 + e)·32 + lane], a warp-private buffer in
  // shared memory (not registers: the backward kernels have none to spare across the dP GEMM that separates this
  // from its use).
  template <bool BIAS_MASK, bool MODS, bool KEY_ROWS, int NT>
  __device__ __forceinline__ void apply(float (&s)[NT][4], int row0, int col0, int lane, float* dcap,
                                        uint32_t pos_mul = 1u << 31, int pos_shift = 31) const {
    const int gr = lane >> 2, tq = lane & 3;
    int qi[2], lo[2], hi[2];  // query index and keys visible by position of the thread's two rows (query rows only)
    if (!KEY_ROWS) {
      qi[0] = div_rows(row0 + gr, pos_mul, pos_shift);
      qi[1] = div_rows(row0 + gr + 8, pos_mul, pos_shift);
      win.key_range(qi[0], lo[0], hi[0]);
      win.key_range(qi[1], lo[1], hi[1]);
    }
    auto positional = [&](auto cap) {  // window, kv_len, Lq; soft cap, ALiBi
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int row = row0 + gr + r * 8;
          const int col = col0 + nt * 8 + 2 * tq + (e & 1);
          const int i = KEY_ROWS ? col : qi[r], j = KEY_ROWS ? row : col;
          const bool vis = KEY_ROWS ? win.visible(i, j) : (col >= lo[r] && col < hi[r]);
          float dc;
          const float m = modded<MODS, decltype(cap)::value>(s[nt][e], i, j, dc);
          if (decltype(cap)::value != kCapOff && dcap != nullptr) dcap[(nt * 4 + e) * 32 + lane] = dc;
          s[nt][e] = vis ? m : -INFINITY;
        }
    };
    // The soft cap: one branch per tile around two instances of the loop, or (dK/dV, whose registers are the
    // tightest) one branch per element. Either way ptxas reports no spills, which other choices do not give.
    if (KEY_ROWS && MODS) {
      positional(std::integral_constant<int, kCapPerElement>());
    } else if (MODS && softcap > 0.f) {
      positional(std::integral_constant<int, kCapOn>());
    } else {
      positional(std::integral_constant<int, kCapOff>());
    }
    if constexpr (BIAS_MASK) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row0 + gr + (e >> 1) * 8;
          const int col = col0 + nt * 8 + 2 * tq + (e & 1);
          const int i = KEY_ROWS ? col : qi[e >> 1], j = KEY_ROWS ? row : col;
          if (s[nt][e] == -INFINITY) continue;  // invisible by position: no load
          if (mask && mask[i * mask_sm + j * mask_sn] == 0) {
            s[nt][e] = -INFINITY;
          } else if (bias) {
            s[nt][e] += Elem<T>::to_float(bias[i * bias_sm + j * bias_sn]) * kLog2e;
          }
        }
    }
  }
};

// Whether the bool mask p.mask leaves some pair (query i, key j) of queries [m0, m0 + rows) and keys [n0, n0 + BN)
// of query head h visible (visible by position too): a CTA-wide vote, so every thread of the CTA must call it.
template <int BN, int NTHREADS>
__device__ __forceinline__ bool mask_tile_seen(const AttnParams& p, const Window& win, int b, int h, int m0, int rows,
                                               int n0, int tid) {
  const uint8_t* mask = p.mask + b * p.mask_sb + h * p.mask_sh;
  int seen = 0;
  for (int e = tid; e < rows * BN && !seen; e += NTHREADS) {
    const int i = m0 + e / BN, j = n0 + e % BN;  // consecutive threads: consecutive keys of a row
    seen = win.visible(i, j) && mask[i * p.mask_sm + j * p.mask_sn] != 0;
  }
  return __syncthreads_or(seen) != 0;
}

// The key tiles a CTA of query rows [m0, m0 + BM) of query head h visits (forward, dQ): BN-key tiles of kv head
// h / (H / Hkv) of sequence b that intersect the window of some row of the block, tiles first .. first + count − 1
// (Window::key_tiles, as Triton's _key_range, over the rows' query positions: PackedRows, for the packed-GQA
// forward); with a bool mask, use_mask_ranges narrows them further.
template <typename T, int BM, int BN, int D, int NTHREADS>
struct KeyTiles {
  int b, hk, k0, kv_len, first, count;  // the tiles' addresses are formed from p at each load, not held

  // win: the sequence's window (Seq::window, Scores::win).
  __device__ __forceinline__ KeyTiles(const AttnParams& p, int b_, int h, int m0, const Seq& seq, const Window& win,
                                      const PackedRows& rows = PackedRows())
      : b(b_), hk(h / (p.H / p.Hkv)), k0(seq.k0), kv_len(seq.kv_len) {
    int i0, n;
    rows.span(m0, BM, i0, n);
    win.key_tiles(i0, n, BN, first, count);
  }

  // With a bool mask: the range mask_ranges_kernel left for query block m0 / BM of head `head` of the grid's
  // `heads` heads of `rows` rows (p.key_ranges; packed GQA: kv heads, fwd_heads and fwd_rows).
  __device__ __forceinline__ void use_mask_ranges(const AttnParams& p, int head, int m0, int heads, int rows) {
    if (p.key_ranges == nullptr) return;
    const int64_t i = 2 * ((static_cast<int64_t>(b) * heads + head) * ((rows + BM - 1) / BM) + m0 / BM);
    first = p.key_ranges[i];
    count = p.key_ranges[i + 1];
  }

  // cp.async of K and V tile n (keys n·BN ..) into sK, sV ([BN][D + 8] each); keys >= kv_len are zero-filled.
  __device__ __forceinline__ void load(const AttnParams& p, T* sK, T* sV, int n, int tid) const {
    load_tile_async<T, BN, D, NTHREADS>(sK, static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + k0 * p.k_sl,
                                        p.k_sl, n * BN, kv_len, tid);
    load_tile_async<T, BN, D, NTHREADS>(sV, static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + k0 * p.v_sl,
                                        p.v_sl, n * BN, kv_len, tid);
  }
};

// The tiles a bool mask leaves to each CTA of an attention kernel, computed before it (a loop with CTA-wide votes
// in the attention kernels themselves made ptxas spill their main loops at the 128-register bound): for KEYS, the
// key tiles of query block blockIdx.x (BM rows) of head blockIdx.y (Window::key_tiles, forward and dQ; the kv head's
// group of query heads for the packed-GQA forward, whose mask is the same for every head); else the
// query tiles (of BM rows) of key block blockIdx.x (BN keys) of kv head blockIdx.y (Window::query_tiles, dK/dV),
// over the GQA group's query heads. Of those, the tiles from the first to the last in which the mask leaves a pair
// visible (Triton's _mask_trim): the tiles it hides at either end (padding, the far side of a causal or banded
// mask given as a tensor) are never loaded nor computed; hidden tiles in between still are. Written as (first
// tile, count) at ranges[2·((b·heads + head)·blocks + block)]. In an unnamed namespace, as the attention kernels:
// each head dim's file instantiates its own.
constexpr int kMaskRangeThreads = 256;

namespace {
template <int BM, int BN, bool KEYS>
__global__ void __launch_bounds__(kMaskRangeThreads) mask_ranges_kernel(const AttnParams p, int32_t* ranges) {
  const int tid = threadIdx.x, block = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const Seq seq(p, b);
  const Window win = seq.window(p);
  const int group = p.H / p.Hkv;
  const int heads = KEYS || p.mask_sh == 0 ? 1 : group;  // dK/dV: the group's heads, one for a shared mask
  int first, count, i0 = 0, rows = BM;  // KEYS: the block's query positions [i0, i0 + rows)
  if (KEYS) {
    PackedRows(p).span(block * BM, BM, i0, rows);
    win.key_tiles(i0, rows, BN, first, count);
  } else {
    win.query_tiles(block * BN, BN, BM, first, count);
    first /= BM;
  }
  auto seen = [&](int t) {
    bool any = false;
    for (int g = 0; g < heads; ++g)
      any |= KEYS ? mask_tile_seen<BN, kMaskRangeThreads>(p, win, b, head * p.pack_gqa, i0, rows, t * BN, tid)
                  : mask_tile_seen<BN, kMaskRangeThreads>(p, win, b, head * group + g, t * BM, BM, block * BN, tid);
    return any;
  };
  while (count > 0 && !seen(first)) {
    ++first;
    --count;
  }
  while (count > 1 && !seen(first + count - 1)) --count;
  if (tid == 0) {
    const int64_t i = 2 * ((static_cast<int64_t>(b) * gridDim.y + head) * gridDim.x + block);
    ranges[i] = first;
    ranges[i + 1] = count;
  }
}
}  // namespace

// Bytes of a range table: B · heads · blocks (first, count) pairs, rounded up to 16 (workspace sections stay
// 16-byte aligned).
inline size_t mask_ranges_bytes(const AttnParams& p, int heads, int64_t len, int block) {
  if (p.mask == nullptr || len <= 0) return 0;
  const size_t n = static_cast<size_t>(p.B) * heads * ((len + block - 1) / block) * 2 * sizeof(int32_t);
  return (n + 15) / 16 * 16;
}

// Sum / max over the 4 threads of a quad (the threads holding one C-fragment row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

// ------------------------------------------------------------------------------------------- host side
// Forward tiles: warps (query block = 16·warps rows) and key block per head dim; shared memory
// (16·W + 4·BN)·(D + 8)·2 bytes: D=32: 30 KB, 64: 54 KB, 96: 78 KB, 128: 102 KB, 256: 99 KB (all within sm80's
// 163 KB). NARROW: the tiles of a GPU whose blocks may opt in to less than the wide tiles need (sm_86 / sm_89,
// 99 KB): D = 128 takes keys 32 at a time there (68 KB), as FlashAttention-2 does on those GPUs.
template <int D, bool NARROW = false> struct FwdCfg { static constexpr int kWarps = 8, kBlockN = 64; };
template <> struct FwdCfg<256, false> { static constexpr int kWarps = 4, kBlockN = 32; };
template <> struct FwdCfg<256, true> : FwdCfg<256, false> {};
template <> struct FwdCfg<128, true> { static constexpr int kWarps = 8, kBlockN = 32; };

template <typename T, int D, int NW, int BN>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(16 * NW + 4 * BN) * (D + 8) * sizeof(T);
}

// Rows of the dQ kernel's query blocks and keys of the dK/dV kernel's key blocks, every head dim
// (bwd_kernels.cuh): the sizes of the backward's mask range tables.
constexpr int kBwdBlock = 64;

// Kernels read q/k/v/do with 16-byte cp.async and write o/dq/dk/dv two elements at a time: a tensor of sizes
// (nb, nh, nl, D) needs a 16-byte aligned pointer and strides that are multiples of 8 elements, except the strides
// of dims of size 1 (never used). An empty tensor (nl == 0) is never touched and may be null.
inline bool aligned_rows(const void* ptr, int64_t sb, int64_t sh, int64_t sl, int64_t nb, int64_t nh, int64_t nl) {
  if (nl == 0) return true;
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (nb == 1 || sb % 8 == 0) &&
         (nh == 1 || sh % 8 == 0) && (nl == 1 || sl % 8 == 0);
}

// (batches, rows) of the query-side (q, o, dq, do) and key-side (k, v, dk, dv) tensors for aligned_rows: a packed
// batch is one batch of total_q / total_k rows, all reached through the row stride.
inline int64_t batches(const AttnParams& p) { return p.cu_seqlens_q != nullptr ? 1 : p.B; }
inline int64_t q_rows(const AttnParams& p) { return p.cu_seqlens_q != nullptr ? p.total_q : p.Lq; }
inline int64_t k_rows(const AttnParams& p) { return p.cu_seqlens_q != nullptr ? p.total_k : p.Lk; }

// Checks shared by forward and backward; nullptr when fine.
inline const char* check_common(const AttnParams& p) {
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) return "fastattn CUDA attention: dtype must be float16 or bfloat16";
  if (p.B <= 0 || p.H <= 0 || p.Hkv <= 0 || p.Lq < 0 || p.Lk < 0)
    return "fastattn CUDA attention: B, H, Hkv must be positive and Lq, Lk non-negative";
  if (p.H % p.Hkv != 0) return "fastattn CUDA attention: H must be a multiple of Hkv";
  if (p.B > 65535 || p.H > 65535) return "fastattn CUDA attention: B and H must be at most 65535";
  if (!(p.dropout_p >= 0.f && p.dropout_p < 1.f)) return "fastattn CUDA attention: dropout_p must lie in [0, 1)";
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    return "fastattn CUDA attention: a packed batch needs both cu_seqlens_q and cu_seqlens_k";
  if (p.cu_seqlens_q != nullptr && (p.total_q < 0 || p.total_k < 0 || p.total_q > 0x7fffffff || p.total_k > 0x7fffffff))
    return "fastattn CUDA attention: total_q and total_k must lie in [0, 2^31)";
  const int64_t nb = batches(p), nq = q_rows(p), nk = k_rows(p);
  if (!aligned_rows(p.q, p.q_sb, p.q_sh, p.q_sl, nb, p.H, nq) ||
      !aligned_rows(p.k, p.k_sb, p.k_sh, p.k_sl, nb, p.Hkv, nk) ||
      !aligned_rows(p.v, p.v_sb, p.v_sh, p.v_sl, nb, p.Hkv, nk) ||
      !aligned_rows(p.o, p.o_sb, p.o_sh, p.o_sl, nb, p.H, nq) ||
      (p.o_lo != nullptr && !aligned_rows(p.o_lo, p.o_sb, p.o_sh, p.o_sl, nb, p.H, nq)))
    return "fastattn CUDA attention: q, k, v, o (and o_lo) must be non-null, 16-byte aligned, with batch/head/row "
           "strides that are multiples of 8 elements";
  if (p.bias && reinterpret_cast<uintptr_t>(p.bias) % 2 != 0) return "fastattn CUDA attention: bias is misaligned";
  if (p.Lq >= kMaxLen || p.Lk >= kMaxLen) return "fastattn CUDA attention: Lq and Lk must be below 2^28";
  if (p.window_left < -1 || p.window_right < -1)
    return "fastattn CUDA attention: window_left and window_right must be >= -1 (-1 = unbounded)";
  if (!(p.softcap >= 0.f) || std::isinf(p.softcap))
    return "fastattn CUDA attention: softcap must be finite and >= 0 (0 = off)";
  if (p.alibi && reinterpret_cast<uintptr_t>(p.alibi) % 4 != 0) return "fastattn CUDA attention: alibi is misaligned";
  if (p.pack_gqa != 1) {  // the rows of a packed CTA differ by position and head only (params.h)
    if (p.pack_gqa != p.H / p.Hkv) return "fastattn CUDA attention: pack_gqa must be 1 or H / Hkv";
    if (p.alibi != nullptr || p.dropout_p > 0.f || (p.bias != nullptr && p.bias_sh != 0) ||
        (p.mask != nullptr && p.mask_sh != 0))
      return "fastattn CUDA attention: pack_gqa needs no ALiBi, no dropout and a bias / mask broadcast over heads";
    if (static_cast<int64_t>(p.Lq) * p.pack_gqa >= kMaxLen)
      return "fastattn CUDA attention: with pack_gqa, Lq · H / Hkv must be below 2^28";
  }
  return nullptr;
}

// Checks p (check_common) and returns, in `out`, the parameters the kernels read: causal folded into the window
// and windows normalised (normalize_window, local.h), which keeps the kernels' index arithmetic within int, and
// the division by pack_gqa as a multiply and shift (div_rows_magic).
inline const char* prepare(const AttnParams& p, AttnParams& out) {
  if (const char* err = check_common(p)) return err;
  out = p;
  normalize_window(out);
  div_rows_magic(out.pack_gqa, out.pack_mul, out.pack_shift);
  return nullptr;
}

// Calls f(T(), std::integral_constant<int, D>()) for the element type and head dim of p (checked before).
template <typename T, typename F>
inline const char* dispatch_head_dim(int d, F&& f) {
  switch (d) {
    case 32: return f(T(), std::integral_constant<int, 32>());
    case 64: return f(T(), std::integral_constant<int, 64>());
    case 96: return f(T(), std::integral_constant<int, 96>());
    case 128: return f(T(), std::integral_constant<int, 128>());
    case 256: return f(T(), std::integral_constant<int, 256>());
    default: return "fastattn CUDA attention: head dim must be 32, 64, 96, 128 or 256";
  }
}

template <typename F>
inline const char* dispatch(const AttnParams& p, F&& f) {
  return p.dtype == kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p.D, f) : dispatch_head_dim<__half>(p.D, f);
}

// The launches of the forward / backward kernels for one element type and head dim, on p checked and prepared by
// attention_fwd / attention_bwd. Defined in fwd_kernels.cuh / bwd_kernels.cuh and instantiated one head dim per
// file in instances/, so that nvcc compiles the head dims in parallel.
template <typename T, int D>
const char* run_fwd(const AttnParams& p, cudaStream_t stream);
template <typename T, int D>
const char* run_bwd(const AttnParams& p, cudaStream_t stream);

// The kernel instance for the run-time flags (BIAS_MASK, DROPOUT, MODS): f(std::bool_constant<BIAS_MASK>(),
// std::bool_constant<DROPOUT>(), std::bool_constant<MODS>()) returns a pointer to it.
template <typename F>
inline auto pick_kernel(bool bias_mask, bool dropout, bool mods, F&& f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (mods)
    return bias_mask ? (dropout ? f(Yes(), Yes(), Yes()) : f(Yes(), No(), Yes()))
                     : (dropout ? f(No(), Yes(), Yes()) : f(No(), No(), Yes()));
  return bias_mask ? (dropout ? f(Yes(), Yes(), No()) : f(Yes(), No(), No()))
                   : (dropout ? f(No(), Yes(), No()) : f(No(), No(), No()));
}

// softcap or ALiBi on: the kernels' MODS flag.
inline bool score_mods(const AttnParams& p) { return p.softcap > 0.f || p.alibi != nullptr; }

// Errors of the attention launchers name the backend and the kernel.
inline std::string kernel_name(const char* what) { return std::string("fastattn CUDA attention: ") + what; }

// The dynamic shared memory a block of the current GPU may opt in to.
inline const char* smem_optin(int& bytes) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return e == cudaSuccess ? nullptr : cuda_failure(kernel_name("shared memory limit"), e);
}

// Whether this GPU takes a kernel's NARROW tiles (FwdCfg, DqCfg): its wide tiles need `wide` bytes of shared
// memory, more than a block may opt in to. Head dims whose narrow tiles are their wide ones never ask.
template <bool HAS_NARROW>
inline const char* narrow_tiles(size_t wide, bool& narrow) {
  narrow = false;
  if constexpr (!HAS_NARROW) return nullptr;
  int optin = 0;
  if (const char* err = smem_optin(optin)) return err;
  narrow = static_cast<size_t>(optin) < wide;
  return nullptr;
}

// The forward's tiles on this GPU (FwdCfg<D> or, where its shared memory does not fit, FwdCfg<D, true>).
template <typename T, int D>
inline const char* fwd_narrow(bool& narrow) {
  using W = FwdCfg<D>;
  using N = FwdCfg<D, true>;
  return narrow_tiles<W::kWarps != N::kWarps || W::kBlockN != N::kBlockN>(
      fwd_smem_bytes<T, D, W::kWarps, W::kBlockN>(), narrow);
}

// Raises the dynamic shared memory limit when needed, launches `kernel` (named `what` in errors), and checks both.
template <typename Kernel, typename... Args>
inline const char* launch(const char* what, Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          Args... args) {
  if (smem > 48 * 1024) {
    int optin = 0;
    if (const char* err = smem_optin(optin)) return err;
    if (static_cast<size_t>(optin) < smem)
      return fail(kernel_name(what) + ": needs more shared memory per block than this GPU allows (sm_86/sm_89 "
                  "GPUs, 99 KB: every head dim but the d256 backward runs there; A100/H100-class GPUs run them all); "
                  "use backend='triton'");
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return cuda_failure(kernel_name(what), e);
  }
  FASTATTN_LAUNCH(kernel, grid, threads, smem, stream, args...);
  return launch_error(kernel_name(what));
}

// Fills `ranges` (p.key_ranges: KEYS, blocks of BM query rows of the H heads; p.query_ranges: blocks of BN keys of
// the Hkv heads) with mask_ranges_kernel, when p has a bool mask and the table.
template <int BM, int BN, bool KEYS>
inline const char* launch_mask_ranges(const AttnParams& p, int32_t* ranges, cudaStream_t stream) {
  if (p.mask == nullptr || ranges == nullptr) return nullptr;
  const int len = KEYS ? fwd_rows(p) : p.Lk, block = KEYS ? BM : BN;
  if (len == 0) return nullptr;
  const dim3 grid((len + block - 1) / block, KEYS ? fwd_heads(p) : p.Hkv, p.B);
  return launch("mask_ranges_kernel", mask_ranges_kernel<BM, BN, KEYS>, grid, kMaskRangeThreads, 0, stream, p,
                ranges);
}

}  // namespace attn
}  // namespace fastattn
