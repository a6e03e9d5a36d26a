// The attention backward kernels for head dim 256, fp16 and bf16.
#include "attention/bwd_kernels.cuh"

namespace fastattn {
namespace attn {
template const char* run_bwd<__half, 256>(const AttnParams&, cudaStream_t);
template const char* run_bwd<__nv_bfloat16, 256>(const AttnParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
