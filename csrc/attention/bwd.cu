// FlashAttention-2 backward (sm80+): the entry point. It checks the arguments and launches the kernels of
// bwd_kernels.cuh for the element type and head dim, instantiated one head dim per file in instances/ (so that
// nvcc compiles them in parallel).
#include "attention.h"
#include "kernel_common.cuh"

namespace fastattn {

// Workspace: delta [B, H, Lq] fp32, then the bool mask's key_ranges (dQ) and query_ranges (dK/dV)
// (attn::mask_ranges_kernel), each 16-byte aligned.
static std::size_t delta_bytes(const AttnParams& p) {
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0) return 0;
  return (static_cast<std::size_t>(p.B) * p.H * p.Lq * sizeof(float) + 15) / 16 * 16;
}

static std::size_t key_ranges_bytes(const AttnParams& p) {
  return p.B <= 0 || p.H <= 0 ? 0 : attn::mask_ranges_bytes(p, p.H, p.Lq, attn::kBwdBlock);
}

static std::size_t query_ranges_bytes(const AttnParams& p) {
  return p.B <= 0 || p.Hkv <= 0 ? 0 : attn::mask_ranges_bytes(p, p.Hkv, p.Lk, attn::kBwdBlock);
}

std::size_t attention_bwd_workspace_bytes(const AttnParams& p) {
  return delta_bytes(p) + key_ranges_bytes(p) + query_ranges_bytes(p);
}

const char* attention_bwd(const AttnParams& params, void* stream) {
  using namespace attn;
  if (!attention_supports_head_dim(params.D))
    return "fastattn CUDA attention: head dim must be 32, 64, 96, 128 or 256";
  AttnParams p;  // causal folded into the window, windows normalised
  if (const char* err = prepare(params, p)) return err;
  if (p.pack_gqa != 1) return "fastattn CUDA attention: pack_gqa is a forward option (the backward runs unpacked)";
  const int64_t nb = batches(p), nq = q_rows(p), nk = k_rows(p);
  if (!aligned_rows(p.dout, p.do_sb, p.do_sh, p.do_sl, nb, p.H, nq) ||
      !aligned_rows(p.dq, p.dq_sb, p.dq_sh, p.dq_sl, nb, p.H, nq) ||
      !aligned_rows(p.dk, p.dk_sb, p.dk_sh, p.dk_sl, nb, p.Hkv, nk) ||
      !aligned_rows(p.dv, p.dv_sb, p.dv_sh, p.dv_sl, nb, p.Hkv, nk))
    return "fastattn CUDA attention: dout, dq, dk, dv must be non-null, 16-byte aligned, with batch/head/row "
           "strides that are multiples of 8 elements";
  if (p.ds_reduce < 0 || p.ds_reduce > 15)
    return "fastattn CUDA attention: ds_reduce must combine kReduceBatch, kReduceHead, kReduceQuery, kReduceKey";
  if (p.Lq > 0 && p.lse == nullptr) return "fastattn CUDA attention: the backward needs lse";
  if (attention_bwd_workspace_bytes(p) > 0 &&
      (p.workspace == nullptr || reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0))
    return "fastattn CUDA attention: the backward needs a 16-byte aligned workspace of "
           "attention_bwd_workspace_bytes()";
  char* ranges = static_cast<char*>(p.workspace) + delta_bytes(p);
  p.key_ranges = key_ranges_bytes(p) > 0 ? reinterpret_cast<int32_t*>(ranges) : nullptr;
  p.query_ranges =
      query_ranges_bytes(p) > 0 ? reinterpret_cast<int32_t*>(ranges + key_ranges_bytes(p)) : nullptr;
  return attn::dispatch(p, [&](auto t, auto d) -> const char* {
    return attn::run_bwd<decltype(t), decltype(d)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastattn
