// A CPU emulator of the CUDA features fastattn's kernels use, so that the kernels themselves (csrc/*.cu, compiled
// by the host compiler with -DFASTATTN_EMULATE) run and are tested on a machine without a GPU, as Triton's
// interpreter runs the Triton kernels. Built into fastattn._C_emu (setup.py); FASTATTN_CUDA_EMULATE=1 sends the
// CUDA backend's CPU tensors there (fastattn/cuda/__init__.py).
//
// Blocks run one after another. The threads of a block are fibers (ucontext) on one OS thread, switched only at
// barriers, in a fixed order: runs are deterministic. __syncthreads waits for the block's live threads (an exited
// thread no longer counts, as on the hardware); the warp-collective instructions (shfl, ldmatrix, mma) trade
// their operands through a per-warp scratch between two barriers of the warp's live threads. A block whose
// threads all wait at barriers that can never complete raises "deadlock". cp.async copies at once (groups are
// complete when issued): the emulator checks what the kernels compute, not their timing; races between threads
// and out-of-bounds accesses are compute-sanitizer's job on a GPU. Dynamic shared memory starts as NaN bytes, so
// a read before a write shows.
//
// Instruction semantics follow the PTX ISA (mma.m16n8k16 .row.col with fp32 accumulators; ldmatrix .m8n8.x4 and
// .trans, b16): see the fragment layouts at the top of csrc/attention/kernel_common.cuh. The products of an MMA
// are summed in fp32 in k order (the hardware's order and internal rounding are unspecified).
#pragma once

#if !defined(FASTATTN_EMULATE) || defined(__CUDACC__)
#error "cuda_emulate.h is for host compilers with FASTATTN_EMULATE defined"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace fastattn_emu {

struct Barrier {
  int arrived = 0, expected = 0;
  uint64_t gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int warp = 0, lane = 0;
  bool done = false;
  const uint64_t* wait_on = nullptr;  // the generation of the barrier this fiber waits at, and its value then
  uint64_t wait_gen = 0;
};

constexpr size_t kStackBytes = 256 << 10;
constexpr int kSlots = 8;  // 64-bit words a lane puts into a warp collective

struct Block {
  dim3 grid, dim;
  uint3 idx;
  std::vector<Fiber> fibers;
  std::vector<Barrier> warp_bar;
  Barrier bar;
  std::vector<uint64_t> scratch;  // [warps][32][kSlots]
  unsigned char* smem = nullptr;  // dynamic shared memory, 128-byte aligned
  int live = 0, cur = 0;
  ucontext_t sched;
  std::function<void()> body;
};

inline Block*& current() {
  static thread_local Block* b = nullptr;
  return b;
}

inline Fiber& me() { return current()->fibers[current()->cur]; }

inline const uint3& thread_idx() { return me().tid; }
inline const uint3& block_idx() { return current()->idx; }
inline const dim3& block_dim() { return current()->dim; }
inline const dim3& grid_dim() { return current()->grid; }
inline unsigned char* dynamic_smem() { return current()->smem; }

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.gen;
}

// Arrive at b; return once every live thread it counts has arrived.
inline void wait(Barrier& b) {
  Block& blk = *current();
  Fiber& f = me();
  const uint64_t gen = b.gen;
  if (++b.arrived >= b.expected) return release(b);
  f.wait_on = &b.gen;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &blk.sched);
}

inline void syncthreads() { wait(current()->bar); }
inline void syncwarp() { wait(current()->warp_bar[me().warp]); }
inline uint64_t* slots(int lane) {
  return &current()->scratch[(static_cast<size_t>(me().warp) * 32 + lane) * kSlots];
}

template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shfl of a register value");
  std::memcpy(slots(me().lane), &v, sizeof(T));
  syncwarp();
  T r;
  std::memcpy(&r, slots(me().lane ^ lane_mask), sizeof(T));
  syncwarp();  // nobody overwrites its slot before every lane has read
  return r;
}

inline uint16_t b16_at(uint64_t addr, int col) {
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const unsigned char*>(addr) + 2 * col, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of matrix i; register
// i of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (of its transpose with .trans), low half
// first.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  const int lane = me().lane;
  slots(lane)[0] = reinterpret_cast<uint64_t>(p);
  syncwarp();
  const int row = lane >> 2, col = 2 * (lane & 3);
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (trans) {  // element (row, c) of the transpose is element (c, row) of the matrix
      lo = b16_at(slots(8 * i + col)[0], row);
      hi = b16_at(slots(8 * i + col + 1)[0], row);
    } else {
      lo = b16_at(slots(8 * i + row)[0], col);
      hi = b16_at(slots(8 * i + row)[0], col + 1);
    }
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  syncwarp();
}

template <typename T>
inline float b16_to_float(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  T x;
  std::memcpy(&x, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d (16x8) += a (16x16) · b (16x8), fragments as in
// kernel_common.cuh (g = lane / 4, t = lane % 4).
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = me().lane;
  uint64_t* mine = slots(lane);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  syncwarp();
  auto A = [](int row, int k) {  // a[reg] of lane (row % 8)·4 + (k % 8)/2: reg 1 for rows 8.., reg 2 for k 8..
    const uint64_t* s = slots((row & 7) * 4 + ((k & 7) >> 1));
    return b16_to_float<T>(static_cast<uint32_t>(s[(row >> 3) + 2 * (k >> 3)]), k & 1);
  };
  auto B = [](int k, int col) {  // b0 (k < 8) or b1 of lane col·4 + (k % 8)/2
    const uint64_t* s = slots(col * 4 + ((k & 7) >> 1));
    return b16_to_float<T>(static_cast<uint32_t>(s[4 + (k >> 3)]), k & 1);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = (lane >> 2) + 8 * (e >> 1), col = 2 * (lane & 3) + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A(row, k), B(k, col), acc);
    out[e] = acc;
  }
  syncwarp();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// cp.async.cg.shared.global [dst], [src], 16, n: n bytes copied, the rest of the 16 zero-filled.
inline void cp_async_16(void* dst, const void* src, uint32_t n) {
  std::memset(dst, 0, 16);
  if (n) std::memcpy(dst, src, n);
}

inline void fiber_main() {
  Block& blk = *current();
  blk.body();
  Fiber& f = me();
  f.done = true;
  --blk.live;
  // The exited thread no longer counts at the block's and its warp's barriers: complete those it was holding up.
  for (Barrier* b : {&blk.bar, &blk.warp_bar[f.warp]}) {
    --b->expected;
    if (b->arrived > 0 && b->arrived >= b->expected) release(*b);
  }
  swapcontext(&f.ctx, &blk.sched);
}

class Stacks {  // fiber stacks, reserved once per OS thread (pages are committed only when touched)
 public:
  unsigned char* get(size_t n) {
    if (n > count_) {
      if (base_) munmap(base_, count_ * kStackBytes);
      void* p = mmap(nullptr, n * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("fastattn emulator: cannot map fiber stacks");
      base_ = static_cast<unsigned char*>(p);
      count_ = n;
    }
    return base_;
  }

 private:
  unsigned char* base_ = nullptr;
  size_t count_ = 0;
};

inline Stacks& stacks() {  // one for every kernel (not one per launch() instance)
  static thread_local Stacks s;
  return s;
}

// kernel<<<grid, dim, smem>>>(args...), every block to completion before the next.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 dim, size_t smem_bytes, Args... args) {
  const int nthreads = static_cast<int>(dim.x * dim.y * dim.z);
  if (nthreads <= 0 || nthreads > 1024) throw std::runtime_error("fastattn emulator: bad block size");
  unsigned char* stack = stacks().get(nthreads);
  const int warps = (nthreads + 31) / 32;
  std::vector<unsigned char> smem(smem_bytes + 128);
  Block blk;
  blk.grid = grid;
  blk.dim = dim;
  blk.fibers.resize(nthreads);
  blk.warp_bar.resize(warps);
  blk.scratch.assign(static_cast<size_t>(warps) * 32 * kSlots, 0);
  blk.smem = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  blk.body = [&] { kernel(args...); };
  Block* saved = current();
  current() = &blk;
  struct Restore {
    Block* b;
    ~Restore() { current() = b; }
  } restore{saved};
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blk.idx = make_uint3(bx, by, bz);
        std::memset(blk.smem, 0xff, smem_bytes);  // NaN in every floating type
        blk.live = nthreads;
        blk.bar = Barrier{0, nthreads, 0};
        for (int w = 0; w < warps; ++w) blk.warp_bar[w] = Barrier{0, std::min(32, nthreads - 32 * w), 0};
        for (int t = 0; t < nthreads; ++t) {
          Fiber& f = blk.fibers[t];
          f = Fiber();
          f.tid = make_uint3(t % dim.x, (t / dim.x) % dim.y, t / (dim.x * dim.y));
          f.warp = t / 32;
          f.lane = t % 32;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stack + static_cast<size_t>(t) * kStackBytes;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_main, 0);
        }
        while (blk.live > 0) {
          bool ran = false;
          for (int t = 0; t < nthreads; ++t) {
            Fiber& f = blk.fibers[t];
            if (f.done || (f.wait_on && *f.wait_on == f.wait_gen)) continue;
            f.wait_on = nullptr;
            blk.cur = t;
            swapcontext(&blk.sched, &f.ctx);
            ran = true;
          }
          if (!ran)
            throw std::runtime_error("fastattn emulator: deadlock in block (" + std::to_string(bx) + ", " +
                                     std::to_string(by) + ", " + std::to_string(bz) +
                                     "): every live thread waits at a barrier the others never reach");
        }
      }
}

}  // namespace fastattn_emu

// The CUDA spellings the kernels use, on top of the emulator.
inline int min(int a, int b) { return a < b ? a : b; }  // CUDA's integer min / max of device code
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>  // cuda_runtime.h's overload for kernel pointers exists under nvcc only
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // a block's threads share it; blocks run one at a time
#define threadIdx (::fastattn_emu::thread_idx())
#define blockIdx (::fastattn_emu::block_idx())
#define blockDim (::fastattn_emu::block_dim())
#define gridDim (::fastattn_emu::grid_dim())
#define __syncthreads() ::fastattn_emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::fastattn_emu::shfl_xor((v), (lane_mask))
