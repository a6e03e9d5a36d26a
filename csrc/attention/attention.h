// Entry points of the fused attention kernels. Each returns nullptr on success, else a message naming what
// went wrong (unsupported argument, or the CUDA error of the launch: every launch is followed by a check of
// the last error). `stream` is a cudaStream_t passed as void* so that callers need no CUDA headers.
#pragma once
#include <cstddef>

#include "params.h"

namespace fastattn {

bool attention_supports_head_dim(int d);
const char* attention_fwd(const AttnParams& p, void* stream);
std::size_t attention_bwd_workspace_bytes(const AttnParams& p);
const char* attention_bwd(const AttnParams& p, void* stream);

}  // namespace fastattn
