// Host driver for the CPU emulator itself (csrc/emulate/cuda_emulate.h; tests/test_emulator.py): small kernels
// with the synchronisation patterns of csrc/ (a cp.async double buffer, a block reduction through __shared__),
// each with a switch that plants the bug the emulator's schedules must expose, and kernels that must fail. Built
// by the test with the host C++ compiler (-DFASTATTN_EMULATE), also with -fsanitize=address. One command per
// stdin line, one answer line each:
//   pipeline ORDER CPASYNC SEED TRAILING WAITN -> the 128 threads' sums, bit patterns: a K/V-style loop over 6
//       tiles of 512 floats (tile t, element e = 1000 t + e), cp.async into two stages, wait_group WAITN (1 is
//       right), __syncthreads, each thread reads another warp's 4 floats between warp shuffles, then a trailing
//       __syncthreads if TRAILING (the one that frees the stage before it is refilled)
//   reduce ORDER SEED FIRST_SYNC -> the 128 threads' results of 4 block sums in a row (round r: sum of (r+1)·t)
//       through one __shared__ array, with or without the barrier that lets the last round's readers finish
//   fault NAME ORDER CPASYNC SEED -> the error ("error: ...", or "no error") of a kernel that breaks one rule whose
//       breach faults on the hardware (kFaults: misaligned or non-shared cp.async / ldmatrix addresses, a
//       misaligned vector load, divergent warp collectives, a shuffle from an exited lane, copies in flight at
//       exit, a deadlock), or keeps them all
//   oob_shared / oob_global -> reads one float past dynamic shared memory / past a global array: "no error"
//       without AddressSanitizer, a report and a non-zero exit with it
#include <cuda_runtime.h>

#include <algorithm>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "host_driver.h"
#include "launch.h"
#include "rows.cuh"

namespace emu = fastattn_emu;

constexpr int kThreads = 128, kTiles = 6, kTile = 4 * kThreads;

__global__ void pipeline(const float* in, float* out, bool trailing, int waitn) {
  FASTATTN_DYNAMIC_SMEM(smem);
  float* stage = reinterpret_cast<float*>(smem);  // [2][kTile]
  const int t = threadIdx.x, lane = t & 31;
  emu::cp_async_16(stage + 4 * t, in + 4 * t, 16);
  emu::cp_async_commit();
  float acc = 0.f;
  for (int it = 0; it < kTiles; ++it) {
    const int st = it & 1;
    if (it + 1 < kTiles) emu::cp_async_16(stage + (st ^ 1) * kTile + 4 * t, in + (it + 1) * kTile + 4 * t, 16);
    emu::cp_async_commit();
    emu::cp_async_wait(waitn);
    __syncthreads();
    const float* s = stage + st * kTile + 4 * ((t + 64) % kThreads);  // two warps away
    for (int k = 0; k < 4; ++k) {
      const float mine = __shfl_xor_sync(0xffffffffu, acc, 1);  // a warp collective between the reads, as an MMA
      acc += s[k] + (lane & 1 ? 0.f : mine - mine);
    }
    if (trailing) __syncthreads();
  }
  emu::cp_async_wait(0);
  out[t] = acc;
}

__global__ void reduce(float* out, bool first_sync) {
  __shared__ float part[kThreads / 32];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  for (int r = 0; r < 4; ++r) {
    float v = static_cast<float>((r + 1) * t);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (first_sync) __syncthreads();  // the previous round's readers are done with `part`
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) sum += part[w];
    out[r * kThreads + t] = sum;
  }
}

// One kernel per rule whose breach faults (or hangs) on the hardware, and case 0 that keeps them all; one warp.
enum Fault {
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
const char* const kFaults[] = {"keeps_the_rules",      "cp_async_dst_misaligned", "cp_async_src_misaligned",
                               "cp_async_dst_outside_shared", "cp_async_in_flight", "ldmatrix_misaligned",
                               "ldmatrix_outside_shared", "divergent_collective", "shfl_from_exited_lane",
                               "vector_load_misaligned",  "deadlock"};
constexpr int kFaultSmem = 1024;

__global__ void fault(Fault which, const unsigned char* global) {  // global: 2 KB, 16-byte aligned
  FASTATTN_DYNAMIC_SMEM(s);
  const int lane = threadIdx.x;
  uint32_t r[4];
  float acc[4] = {};
  switch (which) {
    case kKeepsTheRules:  // copies waited for; every collective kind once, by the whole warp
      emu::cp_async_16(s + 16 * lane, global + 16 * lane, 16);
      emu::cp_async_16(s + 512 + 16 * lane, global, 0);
      emu::cp_async_commit();
      emu::cp_async_wait(0);
      __syncthreads();
      emu::ldmatrix_x4(r, s + 16 * lane, false);
      emu::ldmatrix_x4(r, s + 16 * lane, true);
      emu::mma_m16n8k16<__half>(acc, r, r[0], r[1]);
      emu::mma_m16n8k16<__nv_bfloat16>(acc, r, r[2], r[3]);
      __shfl_xor_sync(0xffffffffu, acc[0], 1);
      break;
    case kCpAsyncDstMisaligned:
      emu::cp_async_16(s + 16 * lane + 8, global + 16 * lane, 16);
      break;
    case kCpAsyncSrcMisaligned:
      emu::cp_async_16(s + 16 * lane, global + 16 * lane + 4, 16);
      break;
    case kCpAsyncDstOutsideShared:  // lane 31's 16 bytes start at the end
      emu::cp_async_16(s + kFaultSmem - 16 * 31 + 16 * lane, global + 16 * lane, 16);
      break;
    case kCpAsyncInFlight:  // committed, never waited for
      emu::cp_async_16(s + 16 * lane, global + 16 * lane, 16);
      emu::cp_async_commit();
      return;
    case kLdmatrixMisaligned:
      emu::ldmatrix_x4(r, s + 16 * lane + 2 * (lane == 5), false);
      break;
    case kLdmatrixOutsideShared:  // a global address where a shared one belongs
      emu::ldmatrix_x4(r, global + 16 * lane, true);
      break;
    case kDivergentCollective:  // half the warp at ldmatrix, half at mma
      if (lane < 16)
        emu::ldmatrix_x4(r, s + 16 * lane, false);
      else
        emu::mma_m16n8k16<__half>(acc, r, 0, 0);
      break;
    case kShflFromExitedLane:
      if (lane == 3) return;
      __shfl_xor_sync(0xffffffffu, acc[0], 1);
      break;
    case kVectorLoadMisaligned: {  // rows.cuh's 16-byte pack load, promised (vec) an alignment the row lacks
      float v[8];
      fastattn::rows::load<__half, 8>(reinterpret_cast<const __half*>(global + 8), 0, 8, true, v, 0.f);
      break;
    }
    case kDeadlock:  // lane 0 at the block barrier, the others at a shuffle that needs lane 0
      if (lane == 0)
        __syncthreads();
      else
        __shfl_xor_sync(0xffffffffu, 1, 1);
      break;
  }
  emu::cp_async_commit();
  emu::cp_async_wait(0);
}

__global__ void oob_global(const float* in, int n, float* out) { out[threadIdx.x] = in[n]; }

__global__ void oob_shared(int n, float* out) {  // n floats of dynamic shared memory
  FASTATTN_DYNAMIC_SMEM(smem);
  out[threadIdx.x] = reinterpret_cast<const float*>(smem)[n];
}

static bool set_schedule(std::istringstream& in) {
  std::string order, copies;
  uint64_t seed = 0;
  in >> order >> copies >> seed;
  return emu::set_schedule(order, copies, seed);
}

static void print_bits(const std::vector<float>& v) {
  std::string line;
  for (float x : v) line += std::to_string(float_bits(x)) + " ";
  std::printf("%s\n", line.c_str());
}

template <typename Launch>
static void print_error(Launch f) {
  try {
    f();
    std::printf("no error\n");
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
  }
}

int main() {
  std::vector<float> in(kTiles * kTile);
  for (int t = 0; t < kTiles; ++t)
    for (int e = 0; e < kTile; ++e) in[t * kTile + e] = 1000.f * t + e;
  return serve_commands([&](const std::string& cmd, std::istringstream& line) {
    std::vector<float> out(4 * kThreads, 0.f);
    if (cmd == "pipeline") {
      int trailing = 1, waitn = 1;
      if (!set_schedule(line)) return false;
      line >> trailing >> waitn;
      FASTATTN_LAUNCH(pipeline, 1, kThreads, 2 * kTile * sizeof(float), 0, in.data(), out.data(), trailing != 0,
                      waitn);
      out.resize(kThreads);
      print_bits(out);
    } else if (cmd == "reduce") {
      std::string order;
      uint64_t seed = 0;
      int first_sync = 1;
      line >> order >> seed >> first_sync;
      if (!emu::set_schedule(order, "eager", seed)) return false;
      FASTATTN_LAUNCH(reduce, 1, kThreads, 0, 0, out.data(), first_sync != 0);
      print_bits(out);
    } else if (cmd == "fault") {
      std::string name;
      line >> name;
      const auto* it = std::find(std::begin(kFaults), std::end(kFaults), name);
      if (it == std::end(kFaults) || !set_schedule(line)) return false;
      const auto* global = reinterpret_cast<const unsigned char*>(in.data());
      print_error([&] {
        FASTATTN_LAUNCH(fault, 2, 32, kFaultSmem, 0, static_cast<Fault>(it - std::begin(kFaults)), global);
      });
    } else if (cmd == "oob_shared") {
      print_error([&] { FASTATTN_LAUNCH(oob_shared, 1, 1, 128 * sizeof(float), 0, 128, out.data()); });
    } else if (cmd == "oob_global") {
      std::vector<float> small(7, 1.f);
      print_error([&] { FASTATTN_LAUNCH(oob_global, 1, 1, 0, 0, small.data(), 7, out.data()); });
    } else {
      return false;
    }
    std::fflush(stdout);
    return true;
  });
}
