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
