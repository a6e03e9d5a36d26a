// FlashAttention-2 forward (sm80+): the entry point. It checks the arguments and launches the kernel of
// fwd_kernels.cuh for the element type and head dim, instantiated one head dim per file in instances/ (so that
// nvcc compiles them in parallel), then, for a split forward, the kernel that merges the splits.
#include "attention.h"
#include "kernel_common.cuh"

namespace fastattn {

bool attention_supports_head_dim(int d) { return d == 32 || d == 64 || d == 96 || d == 128 || d == 256; }

namespace attn {
namespace {

constexpr int kMaxSplits = 256;
constexpr int kCombineWarps = 4;  // rows per CTA of combine_kernel

// Rows per split in the workspace: B·H·Lq ([B, H, Lq], rows within their sequence when packed).
FASTATTN_HD int64_t split_rows(const AttnParams& p) { return static_cast<int64_t>(p.B) * p.H * p.Lq; }

// Merges the S = p.num_splits partial results of a split forward (params.h), one warp per query row (grid: row
// blocks, H, B), lanes over column pairs: lse2 = log2 Σ_s 2^lse2_s, o = Σ_s 2^(lse2_s − m) o_s / Σ_s 2^(lse2_s − m)
// with m = max_s lse2_s (0 and lse2 = +inf where no split saw a visible key). Semantics: _fwd_combine_kernel of
// fastattn/triton/attention.py.
template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kCombineWarps + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  const Seq::Rows q = Seq::reread<false>(p, b);
  if (row >= q.len) return;
  const int S = p.num_splits, D = p.D;
  const int64_t plane = split_rows(p), r0 = (static_cast<int64_t>(b) * p.H + h) * p.Lq + row;
  const float* part_o = static_cast<const float*>(p.workspace);
  const float* part_lse = part_o + S * plane * D;
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) m = fmaxf(m, part_lse[s * plane + r0]);
  const float m_safe = m == -INFINITY ? 0.f : m;  // no split saw a key: every weight exp2(−inf) = 0
  float l = 0.f;
  for (int s = 0; s < S; ++s) l += exp2f(part_lse[s * plane + r0] - m_safe);
  const bool empty = l == 0.f;
  const float inv = empty ? 0.f : 1.f / l;
  const int64_t at = b * p.o_sb + h * p.o_sh + static_cast<int64_t>(q.start + row) * p.o_sl;
  for (int c = 2 * lane; c < D; c += 64) {
    float o0 = 0.f, o1 = 0.f;
    for (int s = 0; s < S; ++s) {
      const float w = exp2f(part_lse[s * plane + r0] - m_safe);
      const float2 x = *reinterpret_cast<const float2*>(part_o + (s * plane + r0) * D + c);
      o0 += w * x.x;
      o1 += w * x.y;
    }
    store_out_pair(static_cast<T*>(p.o), static_cast<T*>(p.o_lo), at + c, o0 * inv, o1 * inv);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[Seq::lse_row0(p, b, h, q.start) + row] = empty ? INFINITY : m_safe + log2f(l);
}

// The keep-mask [B, H, Lq, Lk] of attention dropout (philox.h): the counter of weight (b, h, i, j) is its index in
// the dense mask, so element n is dropout_keep(seed, p, n). A grid-stride loop: any n fits the grid.
__global__ void __launch_bounds__(256) dropout_mask_kernel(uint8_t* keep, int64_t n, uint64_t seed, float p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    keep[i] = dropout_keep(seed, p, static_cast<uint64_t>(i)) ? 1 : 0;
}

}  // namespace
}  // namespace attn

const char* attention_dropout_mask(uint8_t* keep, int64_t n, float dropout_p, uint64_t seed, void* stream) {
  if (n < 0 || (n > 0 && keep == nullptr)) return "fastattn CUDA attention: dropout mask needs n >= 0 bytes at keep";
  if (!(dropout_p >= 0.f && dropout_p <= 1.f)) return "fastattn CUDA attention: dropout_p must lie in [0, 1]";
  if (n == 0) return nullptr;
  const int64_t blocks = (n + 255) / 256;
  const dim3 grid(static_cast<unsigned>(blocks < (1 << 16) ? blocks : (1 << 16)));
  return attn::launch("dropout_mask_kernel", attn::dropout_mask_kernel, grid, 256, 0,
                      static_cast<cudaStream_t>(stream), keep, n, seed, dropout_p);
}

const char* attention_fwd_tile(int d, int& block_m, int& block_n) {
  const auto set = [&](auto t, auto dim) -> const char* {
    constexpr int D = decltype(dim)::value;
    bool narrow = false;
    if (const char* err = attn::fwd_narrow<decltype(t), D>(narrow)) return err;
    block_m = 16 * (narrow ? attn::FwdCfg<D, true>::kWarps : attn::FwdCfg<D>::kWarps);
    block_n = narrow ? attn::FwdCfg<D, true>::kBlockN : attn::FwdCfg<D>::kBlockN;
    return nullptr;
  };
  return attn::dispatch_head_dim<__half>(d, set);
}

// Workspace: the splits' partials (a split forward), then the bool mask's key_ranges (attn::mask_ranges_kernel),
// each 16-byte aligned.
static std::size_t partial_bytes(const AttnParams& p) {
  if (p.num_splits <= 1 || p.B <= 0 || p.H <= 0 || p.Lq <= 0 || p.D <= 0) return 0;
  const std::size_t n = static_cast<std::size_t>(p.num_splits) * attn::split_rows(p) * (p.D + 1) * sizeof(float);
  return (n + 15) / 16 * 16;
}

static std::size_t key_ranges_bytes(const AttnParams& p) {
  int block_m = 0, block_n = 0;
  if (p.B <= 0 || p.H <= 0 || p.pack_gqa < 1 || attention_fwd_tile(p.D, block_m, block_n) != nullptr) return 0;
  // The forward's grid (attn::fwd_heads, fwd_rows), formed here before attention_fwd has checked p.
  return attn::mask_ranges_bytes(p, p.H / p.pack_gqa, static_cast<int64_t>(p.Lq) * p.pack_gqa, block_m);
}

std::size_t attention_fwd_workspace_bytes(const AttnParams& p) { return partial_bytes(p) + key_ranges_bytes(p); }

const char* attention_fwd(const AttnParams& params, void* stream) {
  using namespace attn;
  if (!attention_supports_head_dim(params.D)) return "fastattn CUDA attention: head dim must be 32, 64, 96, 128 or 256";
  if (params.num_splits < 1 || params.num_splits > kMaxSplits)
    return "fastattn CUDA attention: num_splits must lie in [1, 256]";
  AttnParams p;  // causal folded into the window, windows normalised
  if (const char* err = prepare(params, p)) return err;
  if (p.Lq == 0) return nullptr;  // nothing to write
  if (attention_fwd_workspace_bytes(p) > 0 &&
      (p.workspace == nullptr || reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0))
    return "fastattn CUDA attention: a split forward or a bool mask needs a 16-byte aligned workspace of "
           "attention_fwd_workspace_bytes()";
  p.key_ranges = key_ranges_bytes(p) > 0
                     ? reinterpret_cast<int32_t*>(static_cast<char*>(p.workspace) + partial_bytes(p))
                     : nullptr;
  p.query_ranges = nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const char* err = dispatch(p, [&](auto t, auto d) -> const char* {
    return run_fwd<decltype(t), decltype(d)::value>(p, s);
  });
  if (err != nullptr || p.num_splits == 1) return err;
  const dim3 grid((p.Lq + kCombineWarps - 1) / kCombineWarps, p.H, p.B);
  const auto kernel = p.dtype == kBFloat16 ? combine_kernel<__nv_bfloat16> : combine_kernel<__half>;
  return launch("combine_kernel", kernel, grid, kCombineWarps * 32, 0, s, p);
}

}  // namespace fastattn
