// One spelling of a kernel launch and of dynamic shared memory for nvcc and for the CPU emulator
// (csrc/emulate/cuda_emulate.h, compiled by the host compiler with -DFASTATTN_EMULATE).
#pragma once

#if defined(FASTATTN_EMULATE)
#include "emulate/cuda_emulate.h"
#define FASTATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fastattn_emu::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)
#define FASTATTN_DYNAMIC_SMEM(name) unsigned char* name = ::fastattn_emu::dynamic_smem()
#else
#include <cuda_runtime.h>
#define FASTATTN_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define FASTATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <string>

namespace fastattn {

// Host entry points return nullptr or an error message; messages live in a thread-local buffer until the next
// failing call on the same thread (the bindings copy them into the Python exception at once).
inline const char* fail(const std::string& msg) {
  thread_local std::string buf;
  buf = msg;
  return buf.c_str();
}

// `what`: the CUDA error e's name and text. Clears the sticky last error so the next launch does not report it.
inline const char* cuda_failure(const std::string& what, cudaError_t e) {
  cudaGetLastError();
  return fail(what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

// The error of the launch just made, if any, naming `what`.
inline const char* launch_error(const std::string& what) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cuda_failure(what, e);
}

}  // namespace fastattn
