// The CUDA runtime calls of the kernels' host code, for the CPU emulator (cuda_emulate.h): launches run at once
// and raise on failure, so there is never a pending error; the device is an sm_90-like one with 227 KB of
// opt-in shared memory per block. And the emulator's schedule and MMA count, for bindings.cpp (which includes no
// CUDA header).
#include <cuda_runtime.h>

#include <cstdlib>

#include "cuda_emulate.h"

bool fastattn_emu_set_schedule(const std::string& order, const std::string& copies, uint64_t seed) {
  return fastattn_emu::set_schedule(order, copies, seed);
}

uint64_t fastattn_emu_mma_count(bool reset) {
  const uint64_t n = fastattn_emu::mma_count();
  if (reset) fastattn_emu::mma_count() = 0;
  return n;
}

extern "C" {

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorUnknown"; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The shared memory a block may opt in to: an H100's 227 KB, or FASTATTN_EMULATE_SMEM_OPTIN bytes (e.g. 101376,
// the 99 KB of sm_86 / sm_89 GPUs), so that the tests can meet the limits of smaller GPUs.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* optin = std::getenv("FASTATTN_EMULATE_SMEM_OPTIN");
  *value = attr != cudaDevAttrMaxSharedMemoryPerBlockOptin ? 0 : optin != nullptr ? std::atoi(optin) : 227 * 1024;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

}  // extern "C"
