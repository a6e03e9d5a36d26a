// The attention backward kernels for head dim 64, fp16 and bf16.
#include "attention/bwd_kernels.cuh"

namespace fastattn {
namespace attn {
template const char* run_bwd<__half, 64>(const AttnParams&, cudaStream_t);
template const char* run_bwd<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
