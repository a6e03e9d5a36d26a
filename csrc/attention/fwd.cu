// FlashAttention-2 forward (sm80+): the entry point. It checks the arguments and launches the kernel of
// fwd_kernels.cuh for the element type and head dim, instantiated one head dim per file in instances/ (so that
// nvcc compiles them in parallel).
#include "attention.h"
#include "kernel_common.cuh"

namespace fastattn {

bool attention_supports_head_dim(int d) { return d == 32 || d == 64 || d == 96 || d == 128 || d == 256; }

const char* attention_fwd(const AttnParams& params, void* stream) {
  using namespace attn;
  if (!attention_supports_head_dim(params.D)) return "fastattn CUDA attention: head dim must be 32, 64, 96, 128 or 256";
  AttnParams p;  // causal folded into the window, windows normalised
  if (const char* err = prepare(params, p)) return err;
  if (p.Lq == 0) return nullptr;  // nothing to write
  return dispatch(p, [&](auto t, auto d) -> const char* {
    return run_fwd<decltype(t), decltype(d)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastattn
