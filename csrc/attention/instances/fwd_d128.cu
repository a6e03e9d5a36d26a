// The attention forward kernels for head dim 128, fp16 and bf16.
#include "attention/fwd_kernels.cuh"

namespace fastattn {
namespace attn {
template const char* run_fwd<__half, 128>(const AttnParams&, cudaStream_t);
template const char* run_fwd<__nv_bfloat16, 128>(const AttnParams&, cudaStream_t);
}  // namespace attn
}  // namespace fastattn
