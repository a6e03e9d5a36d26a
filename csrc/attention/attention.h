// Entry points of the fused attention kernels. Each returns nullptr on success, else a message naming what
// went wrong (unsupported argument, or the CUDA error of the launch: every launch is followed by a check of
// the last error). `stream` is a cudaStream_t passed as void* so that callers need no CUDA headers.
#pragma once
#include <cstddef>
#include <cstdint>

#include "params.h"

namespace fastattn {

bool attention_supports_head_dim(int d);
// The forward's query and key tile (rows) for head dim d on the current GPU (the host's split-KV and GQA-packing
// heuristics); an error if d is unsupported or the GPU cannot be asked.
const char* attention_fwd_tile(int d, int& block_m, int& block_n);
std::size_t attention_fwd_workspace_bytes(const AttnParams& p);  // 0 unless split (num_splits > 1) or masked
const char* attention_fwd(const AttnParams& p, void* stream);
std::size_t attention_bwd_workspace_bytes(const AttnParams& p);
const char* attention_bwd(const AttnParams& p, void* stream);
// The n = B·H·Lq·Lk bytes of dropout's keep-mask (1 = kept) that the kernels apply for (dropout_p, seed).
const char* attention_dropout_mask(uint8_t* keep, int64_t n, float dropout_p, uint64_t seed, void* stream);

}  // namespace fastattn
