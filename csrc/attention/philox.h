// Attention dropout's random numbers: Philox4x32-10, bit-identical to Triton 3.6's tl.rand(seed, offset)
// (triton/language/random.py), so the CUDA kernels drop exactly the weights the Triton kernels drop and the
// keep-mask written by the Triton _dropout_mask_kernel is the one both backends applied.
//
// Triton's rule, reproduced here step by step:
//   randint4x: counter words c0 = low 32 bits of the int64 offset, c1 = its high 32 bits, c2 = c3 = 0;
//   philox:    key words k0 = low 32 bits of the (64-bit) seed, k1 = its high 32 bits;
//   10 rounds: c0' = umulhi(B, c2) ^ c1 ^ k0, c2' = umulhi(A, c0) ^ c3 ^ k1, c1' = B·c2, c3' = A·c0 (mod 2^32),
//              k0 += 0x9E3779B9, k1 += 0xBB67AE85, with A = 0xD2511F53, B = 0xCD9E8D57;
//   randint returns c0; uint_to_uniform_float reads it as int32 x, maps x < 0 to −x − 1 (so x ∈ [0, 2^31)),
//   converts to fp32 (round to nearest) and multiplies by the fp32 constant 4.6566127342e-10 (< 1 for every x).
// Attention keeps weight (b, h, i, j) iff u(seed, ((b·H + h)·Lq + i)·Lk + j) >= p (fp32 compare), i, j local to
// the sequence and Lq, Lk the padded extents (max_seqlen for packed batches): fastattn/triton/attention.py _keep.
//
// No CUDA headers: the functions are __host__ __device__ under nvcc and plain inline C++ otherwise, so that
// tests/test_cuda_philox.py can compile them on a machine without a GPU and compare them with Triton's
// interpreter bit for bit.
#pragma once
#include <cstdint>

#include "params.h"

#if defined(__CUDACC__)
#define FASTATTN_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_HD inline
#endif

namespace fastattn {

// High 32 bits of the 64-bit product (Triton's math.umulhi).
FASTATTN_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// tl.randint(seed, offset) for an int64 offset (offsets here are never negative).
FASTATTN_HD uint32_t philox_u32(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi_u32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi_u32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// tl.rand(seed, offset): uniform in [0, 1).
FASTATTN_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  const int32_t x = static_cast<int32_t>(philox_u32(seed, offset));
  // Triton's −x − 1 for x < 0, written as ~x (the same value) so that x = INT32_MIN does not overflow.
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

// Dropout keeps the weight at Philox counter `counter` (see above) with probability 1 − p.
FASTATTN_HD bool dropout_keep(uint64_t seed, float p, uint64_t counter) { return philox_uniform(seed, counter) >= p; }

// The keep-mask of one (batch b, query head h): weight (i, j) has counter ((b·H + h)·Lq + i)·Lk + j, exactly the
// Triton kernels' (_keep), so both backends and the debug mask (dropout_mask) agree bit for bit. The kernels and
// the host test driver (tests/philox_host.cpp) use this same struct.
struct DropoutMask {
  uint64_t seed, base;  // base: counter of (i, j) = (0, 0)
  int64_t Lk;
  float p;

  FASTATTN_HD DropoutMask(const AttnParams& prm, int b, int h)
      : seed(prm.seed),
        base(static_cast<uint64_t>((static_cast<int64_t>(b) * prm.H + h) * prm.Lq * prm.Lk)),
        Lk(prm.Lk),
        p(prm.dropout_p) {}

  FASTATTN_HD bool keep(int i, int j) const {
    return dropout_keep(seed, p, base + static_cast<uint64_t>(static_cast<int64_t>(i) * Lk + j));
  }
};

}  // namespace fastattn
