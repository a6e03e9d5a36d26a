"""Every CUDA C++ kernel once, on small shapes, for ``compute-sanitizer`` (``make gpu-sanitize``).

Not a pytest module: the sanitizer wraps this process, and each tool reports on every kernel it launched.
Covers attention forward + backward (causal, kv_lens, bool mask (with its tile ranges), bias with gradient (full and
broadcast), GQA, dropout, packed varlen, head dims 64 and 256), the split-KV forward with packed GQA (decoding, and
speculative decoding with a bool mask) and its merge, softmax (fp16 and fp32) and LayerNorm / add + LayerNorm
forward + backward.
``python tests/gpu_sanitize.py cpu`` runs the same launches on the CPU emulator (tests/test_gpu_session.py does, so
the script itself is known to run before a GPU lease is spent on it).
"""
import os
import sys

import torch

dev, dt = (sys.argv[1] if len(sys.argv) > 1 else "cuda"), torch.float16
if dev == "cpu":
    os.environ["FASTATTN_CUDA_EMULATE"] = "1"  # read when fastattn is imported
import fastattn  # noqa: E402
from fastattn.triton.attention import forced_splits  # noqa: E402

torch.manual_seed(0)


def grads(out, *inputs):
    return torch.autograd.grad(out.float().square().sum(), inputs)


# Odd lengths spanning several tiles on the GPU; on the emulator (which only shows that this script runs) fewer.
LQ, LK, CU, MAX_LEN = (77, 130, [0, 5, 70, 133], 65) if dev != "cpu" else (21, 40, [0, 5, 30, 41], 25)


def attention():
    for D in (64, 256):
        q = torch.randn(2, 4, LQ, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(2, 2, LK, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(2, 2, LK, D, device=dev, dtype=dt, requires_grad=True)
        kv_lens = torch.tensor([LK, LK // 2 - 4], device=dev, dtype=torch.int32)
        grads(fastattn.attention(q, k, v, causal=True, causal_alignment="bottom_right", kv_lens=kv_lens,
                                 backend="cuda"), q, k, v)
        mask = torch.rand(2, 1, LQ, LK, device=dev) > 0.3
        grads(fastattn.attention(q, k, v, attn_bias=mask, dropout_p=0.2, backend="cuda"), q, k, v)
        causal = torch.ones(LQ, LK, device=dev, dtype=torch.bool).tril()  # hides whole tiles: trimmed ranges
        grads(fastattn.attention(q, k, v, attn_bias=causal, backend="cuda"), q, k, v)
        with forced_splits(3):  # decoding: packed GQA rows, split keys, merged by combine_kernel
            grads(fastattn.attention(q[:, :, :1], k, v, causal=True, causal_alignment="bottom_right",
                                     kv_lens=kv_lens, backend="cuda"), q, k, v)
        with forced_splits(2):  # speculative decoding: 5 queries of 2 heads per CTA, the mask's packed tile ranges
            grads(fastattn.attention(q[:, :, :5], k, v, attn_bias=mask[:, :, :5], backend="cuda"), q, k, v)
        # dbias: full size (written by the dQ kernel), broadcast over the batch, over heads and queries (summed
        # across warps through shared memory), over everything but the heads (row and column sums)
        for shape in ((2, 4, LQ, LK), (1, 4, LQ, LK), (2, 1, 1, LK), (1, 4, 1, 1)):
            bias = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            grads(fastattn.attention(q, k, v, attn_bias=bias, backend="cuda"), q, k, v, bias)
    lens = torch.tensor(CU, device=dev, dtype=torch.int32)
    q, k, v = (torch.randn(CU[-1], 4, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    grads(fastattn.attention(q, k, v, cu_seqlens_q=lens, cu_seqlens_k=lens, max_seqlen_q=MAX_LEN,
                             max_seqlen_k=MAX_LEN, causal=True, backend="cuda"), q, k, v)


def softmax_and_layer_norm():
    x = torch.randn(37, 1000, device=dev, dtype=dt, requires_grad=True)
    grads(fastattn.softmax(x, -1, backend="cuda"), x)
    grads(fastattn.softmax(x.float(), -1, backend="cuda"), x)  # fp32 rows: the normaliser summed in fp64
    w = torch.randn(1000, device=dev, requires_grad=True)
    b = torch.randn(1000, device=dev, requires_grad=True)
    grads(fastattn.layer_norm(x, 1000, w, b, backend="cuda"), x, w, b)
    r = torch.randn_like(x, requires_grad=True)
    grads(fastattn.add_layer_norm(x, r, 1000, w, b, backend="cuda"), x, r, w, b)


if __name__ == "__main__":
    attention()
    softmax_and_layer_norm()
    if dev != "cpu":
        torch.cuda.synchronize()
    print(f"gpu_sanitize: every CUDA kernel ran ({dev})")
