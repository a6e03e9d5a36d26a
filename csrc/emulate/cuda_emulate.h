// A CPU emulator of the CUDA features fastattn's kernels use, so that the kernels themselves (csrc/*.cu, compiled
// by the host compiler with -DFASTATTN_EMULATE) run and are tested on a machine without a GPU, as Triton's
// interpreter runs the Triton kernels. Built into fastattn._C_emu (setup.py); FASTATTN_CUDA_EMULATE=1 sends the
// CUDA backend's CPU tensors there (fastattn/cuda/__init__.py).
//
// Blocks run one after another. The threads of a block are fibers (ucontext) on one OS thread, switched only at
// barriers. __syncthreads waits for the block's live threads (an exited thread no longer counts, as on the
// hardware); the warp-collective instructions (shfl, ldmatrix, mma) trade their operands through a per-warp
// scratch between two barriers of the warp's live threads. A block whose threads all wait at barriers that can
// never complete raises "deadlock". Dynamic shared memory starts as NaN bytes, so a read before a write shows.
//
// Races. A schedule (set_schedule) fixes two freedoms the hardware has, so that a kernel that depends on either
// gives different results under different schedules (tests/test_cuda_emulated.py compares them bit for bit):
// - order: which runnable thread runs (to its next barrier) next. Round-robin: "forward" (every runnable thread
//   once per round, thread 0 first), "reverse", "shuffle" (a new seeded permutation every round): the warps move
//   in near lockstep. Greedy: "first-ahead" (always the lowest-numbered runnable thread, so warp 0 runs as far as
//   it can, to a block barrier, before warp 1 moves) and "last-ahead" (the highest). Two threads that touch the
//   same shared memory with no block barrier between, one of them writing, see each other's accesses in another
//   order under another schedule.
// - cp.async: when an asynchronous copy lands: "eager" (when issued, the earliest it may) or "lazy" (at the
//   cp.async.wait_group that retires its group, the latest). A read of a stage before its wait sees stale data
//   when lazy; a refill of a stage that other threads still read is seen by them when eager. A thread that exits
//   with copies in flight is an error.
// Runs under one schedule are deterministic. What stays unseen: races between accesses within one interval of
// one thread's run (threads never interleave between barriers).
//
// Faults of the hardware, each raised as an error naming the thread and block: an ldmatrix row address or a
// cp.async destination outside the launch's dynamic shared memory or not 16-byte aligned, a cp.async source not
// 16-byte aligned, a vector load or store (rows.cuh) not aligned to its size; a warp collective met by lanes at
// different collectives, a shuffle reading an exited lane; a thread exiting with cp.async copies in flight.
//
// Out-of-bounds accesses: built with -fsanitize=address (fastattn._C_emu_asan, `make emu-memcheck`), every load
// and store of the kernels is checked by AddressSanitizer: global memory against torch's CPU allocations,
// __shared__ arrays (statics here) against their bounds, dynamic shared memory against the size the launch asked
// for (the bytes around it are poisoned).
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

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FASTATTN_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FASTATTN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FASTATTN_POISON(p, n) ((void)(p), (void)(n))
#define FASTATTN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace fastattn_emu {

struct Barrier {
  int arrived = 0, expected = 0;
  uint64_t gen = 0;
};

struct Copy {  // a cp.async not yet retired by a wait_group (landed already when eager)
  void* dst;
  const void* src;
  uint32_t n;
  bool landed;
};

inline void land(Copy& c) {  // cp.async.cg ... 16, n: n bytes copied, the rest of the 16 zero-filled
  if (c.landed) return;
  std::memset(c.dst, 0, 16);
  if (c.n) std::memcpy(c.dst, c.src, c.n);
  c.landed = true;
}

enum class Order { kForward, kReverse, kShuffle, kFirstAhead, kLastAhead };

struct Schedule {
  Order order = Order::kForward;
  bool lazy_copies = false;  // cp.async lands at its wait_group, not when issued
  uint64_t seed = 0;
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

// set_schedule("first-ahead", "lazy", 0); false (and no change) for an unknown order or landing.
inline bool set_schedule(const std::string& order, const std::string& copies, uint64_t seed) {
  static const char* const orders[] = {"forward", "reverse", "shuffle", "first-ahead", "last-ahead"};
  if (copies != "eager" && copies != "lazy") return false;
  for (int i = 0; i < 5; ++i)
    if (order == orders[i]) {
      schedule() = {static_cast<Order>(i), copies == "lazy", seed};
      return true;
    }
  return false;
}

struct Fiber {
  ucontext_t ctx;
  std::vector<Copy> open;                // cp.async issued since the last commit_group
  std::deque<std::vector<Copy>> groups;  // committed groups in flight, oldest first
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
  size_t smem_bytes = 0;
  int live = 0, cur = 0;
  int vote = 0;       // __syncthreads_or's result
  std::string error;  // raised by launch() once the fibers are back (an exception cannot cross swapcontext)
  ucontext_t sched;
  std::function<void()> body;
};

inline Block*& current() {
  static thread_local Block* b = nullptr;
  return b;
}

inline Fiber& me() { return current()->fibers[current()->cur]; }

// Records the first violation of a rule the hardware enforces, naming the thread; launch() raises it once the
// block's fibers are back. The offending access is skipped (the hardware would have stopped the kernel there).
inline void fault(const std::string& what) {
  Block& blk = *current();
  if (blk.error.empty())
    blk.error = "fastattn emulator: thread " + std::to_string(blk.cur) + " of block (" + std::to_string(blk.idx.x) +
                ", " + std::to_string(blk.idx.y) + ", " + std::to_string(blk.idx.z) + ") " + what;
}

inline std::string hex(const void* p) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p)));
  return buf;
}

// A vector access of `bytes` bytes (uint2, uint4) at p: the hardware faults when p is not a multiple of them.
inline bool aligned_vector(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return true;
  fault(std::string(what) + " of " + std::to_string(bytes) + " bytes at " + hex(p) +
        " is not aligned to its size (misaligned address)");
  return false;
}

// ldmatrix's row addresses and cp.async's destination: 16 bytes of the launch's dynamic shared memory, 16-byte
// aligned. On the hardware a misaligned address faults ("misaligned address") and an address outside the shared
// window reads or writes another block's shared memory or faults, depending on where it falls.
inline bool shared_row(const void* p, const char* what) {
  const Block& blk = *current();
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto offset = static_cast<long long>(a - reinterpret_cast<uintptr_t>(blk.smem));
  const auto size = static_cast<long long>(blk.smem_bytes);
  if (offset < 0 || offset + 16 > size) {
    const bool near = offset > -(1 << 20) && offset < size + (1 << 20);  // else it is no shared address at all
    fault(std::string(what) + (near ? " at shared byte offset " + std::to_string(offset) : " " + hex(p)) +
          " lies outside the launch's " + std::to_string(size) + " bytes of dynamic shared memory");
    return false;
  }
  if (a % 16) {
    fault(std::string(what) + " at shared byte offset " + std::to_string(offset) +
          " is not 16-byte aligned (misaligned address)");
    return false;
  }
  return true;
}

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

// __syncthreads_or: a barrier that returns whether any live thread of the block passed a nonzero predicate. The
// first barrier keeps the last call's readers from seeing this call's reset.
inline int syncthreads_or(int pred) {
  Block& blk = *current();
  syncthreads();
  blk.vote = 0;
  syncthreads();
  if (pred) blk.vote = 1;
  syncthreads();
  return blk.vote;
}
inline void syncwarp() { wait(current()->warp_bar[me().warp]); }
inline uint64_t* slots(int lane) {
  return &current()->scratch[(static_cast<size_t>(me().warp) * 32 + lane) * kSlots];
}

// The warp collectives. A lane puts its operands into its slots, trade() waits for the warp's live lanes, the
// lanes read each other's slots, and a second syncwarp keeps the slots until every lane has read.
enum Collective : uint64_t { kShfl = 1, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBf16 };
constexpr int kKindSlot = kSlots - 1;  // where a lane says which collective it is at (operands use at most 6)

inline const char* collective_name(uint64_t kind) {
  static const char* const names[] = {"?", "shfl.sync", "ldmatrix", "ldmatrix.trans", "mma (f16)", "mma (bf16)"};
  return names[kind < 6 ? kind : 0];
}

// Whether lane l of the caller's warp exists and has not exited.
inline bool lane_here(int l) {
  const std::vector<Fiber>& fibers = current()->fibers;
  const size_t t = static_cast<size_t>(me().warp) * 32 + l;
  return t < fibers.size() && !fibers[t].done;
}

// Checks that the warp's live lanes are at the same kind of collective (ldmatrix and mma are .sync.aligned:
// the whole warp executes the same instruction; a lane at another one would trade operands with it here).
inline void trade(Collective kind) {
  const int lane = me().lane;
  slots(lane)[kKindSlot] = kind;
  syncwarp();
  for (int step = 1; step < 32; ++step) {  // the next live lane: the lanes' checks form a cycle
    const int other = (lane + step) % 32;
    if (!lane_here(other)) continue;
    const uint64_t theirs = slots(other)[kKindSlot];
    if (theirs != kind)
      fault(std::string("is at ") + collective_name(kind) + " while lane " + std::to_string(other) +
            " of its warp is at " + collective_name(theirs) + " (a warp collective needs the whole warp converged)");
    break;
  }
}

template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shfl of a register value");
  std::memcpy(slots(me().lane), &v, sizeof(T));
  trade(kShfl);
  T r;
  const int src = me().lane ^ lane_mask;
  if (!lane_here(src))
    fault("reads lane " + std::to_string(src) + " of its warp in shfl.sync, which has exited or does not exist " +
          "(full-mask shuffles need every lane of the warp)");
  std::memcpy(&r, slots(src), sizeof(T));
  syncwarp();  // nobody overwrites its slot before every lane has read
  return r;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of matrix i; register
// i of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (of its transpose with .trans), low half
// first.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  static const unsigned char zeros[16] = {};
  const Collective kind = trans ? kLdmatrixTrans : kLdmatrix;
  const int lane = me().lane;
  const bool ok = shared_row(p, trans ? "ldmatrix.trans row address" : "ldmatrix row address");
  slots(lane)[0] = reinterpret_cast<uint64_t>(ok ? p : zeros);  // a bad row reads as zeros (the fault is raised)
  trade(kind);
  auto at = [&](int l, int col) {  // element col of the row lane l gave
    const unsigned char* row_p = zeros;  // unless lane l is here: an exited lane or one at another collective
    if (!lane_here(l))
      fault("needs the row address of lane " + std::to_string(l) + " of its warp in " + collective_name(kind) +
            ", which has exited or does not exist");
    else if (slots(l)[kKindSlot] == kind)  // else trade() has raised the divergence
      row_p = reinterpret_cast<const unsigned char*>(slots(l)[0]);
    uint16_t v;
    std::memcpy(&v, row_p + 2 * col, 2);
    return v;
  };
  const int row = lane >> 2, col = 2 * (lane & 3);
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (trans) {  // element (row, c) of the transpose is element (c, row) of the matrix
      lo = at(8 * i + col, row);
      hi = at(8 * i + col + 1, row);
    } else {
      lo = at(8 * i + row, col);
      hi = at(8 * i + row, col + 1);
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

// Warp-level MMAs executed since the last reset (tests count the tiles a kernel computes).
inline uint64_t& mma_count() {
  static uint64_t n = 0;
  return n;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d (16x8) += a (16x16) · b (16x8), fragments as in
// kernel_common.cuh (g = lane / 4, t = lane % 4).
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = me().lane;
  if (lane == 0) ++mma_count();
  uint64_t* mine = slots(lane);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  trade(std::is_same_v<T, __half> ? kMmaF16 : kMmaBf16);
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

// cp.async.cg.shared.global [dst], [src], 16, n; cp.async.commit_group; cp.async.wait_group n.
inline void cp_async_16(void* dst, const void* src, uint32_t n) {
  if (!shared_row(dst, "cp.async destination")) return;
  if (reinterpret_cast<uintptr_t>(src) % 16)  // even with n = 0: the PTX ISA requires the alignment regardless
    return fault("cp.async source " + hex(src) + " is not 16-byte aligned (misaligned address)");
  Copy c{dst, src, n, false};
  if (!schedule().lazy_copies) land(c);
  me().open.push_back(c);
}

inline void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

inline void cp_async_wait(size_t pending) {  // every committed group but the newest `pending` has landed
  Fiber& f = me();
  for (; f.groups.size() > pending; f.groups.pop_front())
    for (Copy& c : f.groups.front()) land(c);
}

inline void fiber_main() {
  Block& blk = *current();
  blk.body();
  Fiber& f = me();
  bool in_flight = !f.open.empty();
  for (const auto& g : f.groups) in_flight = in_flight || !g.empty();
  if (in_flight) fault("exited with cp.async copies in flight (no cp.async.wait_group 0 before the end)");
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
  std::vector<unsigned char> smem(smem_bytes + 256);
  Block blk;
  blk.grid = grid;
  blk.dim = dim;
  blk.fibers.resize(nthreads);
  blk.warp_bar.resize(warps);
  blk.scratch.assign(static_cast<size_t>(warps) * 32 * kSlots, 0);
  blk.smem = smem.data() + 128 - reinterpret_cast<uintptr_t>(smem.data()) % 128;
  blk.smem_bytes = smem_bytes;
  // Outside [smem, smem + smem_bytes) is out of bounds (at least 1 byte before, 128 after).
  FASTATTN_POISON(smem.data(), blk.smem - smem.data());
  FASTATTN_POISON(blk.smem + smem_bytes, smem.data() + smem.size() - (blk.smem + smem_bytes));
  struct Unpoison {
    std::vector<unsigned char>& v;
    ~Unpoison() { FASTATTN_UNPOISON(v.data(), v.size()); }
  } unpoison{smem};
  blk.body = [&] { kernel(args...); };
  const Schedule sched = schedule();
  std::mt19937_64 rng(sched.seed);
  std::vector<int> order(nthreads);
  const bool greedy = sched.order == Order::kFirstAhead || sched.order == Order::kLastAhead;
  const bool backwards = sched.order == Order::kReverse || sched.order == Order::kLastAhead;
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
          for (int i = 0; i < nthreads; ++i) order[i] = backwards ? nthreads - 1 - i : i;
          if (sched.order == Order::kShuffle) std::shuffle(order.begin(), order.end(), rng);
          bool ran = false;
          for (int t : order) {
            Fiber& f = blk.fibers[t];
            if (f.done || (f.wait_on && *f.wait_on == f.wait_gen)) continue;
            f.wait_on = nullptr;
            blk.cur = t;
            swapcontext(&blk.sched, &f.ctx);
            ran = true;
            if (greedy) break;  // start again from the first thread of the order
          }
          if (!ran)  // a fault recorded before the deadlock is its likely cause: it is the one raised
            throw std::runtime_error(!blk.error.empty()
                                         ? blk.error
                                         : "fastattn emulator: deadlock in block (" + std::to_string(bx) + ", " +
                                               std::to_string(by) + ", " + std::to_string(bz) +
                                               "): every live thread waits at a barrier the others never reach");
        }
        if (!blk.error.empty()) throw std::runtime_error(blk.error);
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
#define __syncthreads_or(pred) ::fastattn_emu::syncthreads_or(pred)
#define __shfl_xor_sync(mask, v, lane_mask) ::fastattn_emu::shfl_xor((v), (lane_mask))
