// The CUDA runtime calls of the kernels' host code, for the CPU emulator (cuda_emulate.h): launches run at once
// and raise on failure, so there is never a pending error; the device is an sm_90-like one with 227 KB of
// opt-in shared memory per block. And, for bindings.cpp (which includes no CUDA header), the emulator's schedule and
// its self-tests.
#include <cuda_runtime.h>

#include "cuda_emulate.h"
#include "../rows.cuh"

bool fastattn_emu_set_schedule(const std::string& order, const std::string& copies, uint64_t seed) {
  return fastattn_emu::set_schedule(order, copies, seed);
}

extern "C" {

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorUnknown"; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : 0;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

}  // extern "C"

// Kernels that each break one rule the emulator enforces (and one that keeps them all), so that
// tests/test_cuda_emulated.py shows every check fires: fastattn._C_emu.selftest(name) returns the launch's error,
// empty when there is none, under the current schedule.
namespace {

enum SelfTest {
  kKeepsTheRules,
  kCpAsyncDstMisaligned,
  kCpAsyncSrcMisaligned,
  kCpAsyncDstOutsideShared,
  kCpAsyncInFlight,
  kLdmatrixMisaligned,
  kLdmatrixOutsideShared,
  kDivergentCollective,
  kShflFromExitedLane,
  kVectorLoadMisaligned,
  kDeadlock,
};

constexpr size_t kSelfTestSmem = 1024;  // 2 KB of global source below: every lane copies 16 bytes twice

void selftest_kernel(SelfTest which, const unsigned char* global) {
  using namespace fastattn_emu;
  unsigned char* s = dynamic_smem();
  const int lane = static_cast<int>(thread_idx().x);
  uint32_t r[4];
  float acc[4] = {};
  switch (which) {
    case kKeepsTheRules:  // copy in, wait, every collective kind once, by the whole warp
      cp_async_16(s + 16 * lane, global + 16 * lane, 16);
      cp_async_16(s + 512 + 16 * lane, global, 0);
      cp_async_commit();
      cp_async_wait(0);
      syncthreads();
      ldmatrix_x4(r, s + 16 * lane, false);
      ldmatrix_x4(r, s + 16 * lane, true);
      mma_m16n8k16<__half>(acc, r, r[0], r[1]);
      mma_m16n8k16<__nv_bfloat16>(acc, r, r[2], r[3]);
      (void)shfl_xor(acc[0], 1);
      break;
    case kCpAsyncDstMisaligned:
      cp_async_16(s + 16 * lane + 8, global + 16 * lane, 16);
      break;
    case kCpAsyncSrcMisaligned:
      cp_async_16(s + 16 * lane, global + 16 * lane + 4, 16);
      break;
    case kCpAsyncDstOutsideShared:  // lane 31's 16 bytes end 16 past the end
      cp_async_16(s + kSelfTestSmem - 16 * 31 + 16 * lane, global + 16 * lane, 16);
      break;
    case kCpAsyncInFlight:  // committed, never waited for
      cp_async_16(s + 16 * lane, global + 16 * lane, 16);
      cp_async_commit();
      return;
    case kLdmatrixMisaligned:
      ldmatrix_x4(r, s + 16 * lane + 2 * (lane == 5), false);
      break;
    case kLdmatrixOutsideShared:  // a global address where a shared one belongs
      ldmatrix_x4(r, global + 16 * lane, true);
      break;
    case kDivergentCollective:  // half the warp at ldmatrix, half at mma
      if (lane < 16)
        ldmatrix_x4(r, s + 16 * lane, false);
      else
        mma_m16n8k16<__half>(acc, r, 0, 0);
      break;
    case kShflFromExitedLane:
      if (lane == 3) return;
      (void)shfl_xor(acc[0], 1);
      break;
    case kVectorLoadMisaligned: {  // rows.cuh's 16-byte pack load, promised (vec) an aligned row it lacks
      float v[8];
      fastattn::rows::load<__half, 8>(reinterpret_cast<const __half*>(global + 8), 0, 8, true, v, 0.f);
      break;
    }
    case kDeadlock:  // lane 0 at a warp collective while the rest of the block waits at __syncthreads
      if (lane == 0)
        (void)shfl_xor(acc[0], 1);
      else
        syncthreads();
      break;
  }
  cp_async_commit();
  cp_async_wait(0);
}

}  // namespace

std::string fastattn_emu_selftest(const std::string& name) {
  static const char* const names[] = {"keeps-the-rules",        "cp-async-dst-misaligned", "cp-async-src-misaligned",
                                      "cp-async-dst-outside-shared", "cp-async-in-flight", "ldmatrix-misaligned",
                                      "ldmatrix-outside-shared", "divergent-collective",   "shfl-from-exited-lane",
                                      "vector-load-misaligned",  "deadlock"};
  for (int i = 0; i < static_cast<int>(sizeof(names) / sizeof(names[0])); ++i)
    if (name == names[i]) {
      alignas(16) static unsigned char global[2048];
      for (size_t b = 0; b < sizeof(global); ++b) global[b] = static_cast<unsigned char>(b * 37);
      try {
        fastattn_emu::launch(selftest_kernel, dim3(2), dim3(32), kSelfTestSmem, static_cast<SelfTest>(i),
                             static_cast<const unsigned char*>(global));
      } catch (const std::runtime_error& e) {
        return e.what();
      }
      return "";
    }
  throw std::invalid_argument("name: no emulator self-test '" + name + "'");
}
