"""Every CUDA C++ kernel once, on small shapes, for ``compute-sanitizer`` (``make gpu-sanitize``).

Not a pytest module: the sanitizer wraps this process, and each tool reports on every kernel it launched.
Covers attention forward + backward (causal, kv_lens, bool mask, bias with gradient (full and broadcast), GQA, dropout, packed
varlen, head dims 64 and 256), softmax and LayerNorm / add + LayerNorm forward + backward.
"""
import torch

import fastattn

torch.manual_seed(0)
dev, dt = "cuda", torch.float16


def grads(out, *inputs):
    return torch.autograd.grad(out.float().square().sum(), inputs)


def attention():
    for D in (64, 256):
        q = torch.randn(2, 4, 77, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(2, 2, 130, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(2, 2, 130, D, device=dev, dtype=dt, requires_grad=True)
        kv_lens = torch.tensor([130, 61], device=dev, dtype=torch.int32)
        grads(fastattn.attention(q, k, v, causal=True, causal_alignment="bottom_right", kv_lens=kv_lens,
                                 backend="cuda"), q, k, v)
        mask = torch.rand(2, 1, 77, 130, device=dev) > 0.3
        grads(fastattn.attention(q, k, v, attn_bias=mask, dropout_p=0.2, backend="cuda"), q, k, v)
        # dbias: full size (written by the dQ kernel), broadcast over the batch, over heads and queries (summed
        # across warps through shared memory), over everything but the heads (row and column sums)
        for shape in ((2, 4, 77, 130), (1, 4, 77, 130), (2, 1, 1, 130), (1, 4, 1, 1)):
            bias = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            grads(fastattn.attention(q, k, v, attn_bias=bias, backend="cuda"), q, k, v, bias)
    lens = torch.tensor([0, 5, 70, 133], device=dev, dtype=torch.int32)
    q, k, v = (torch.randn(133, 4, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    grads(fastattn.attention(q, k, v, cu_seqlens_q=lens, cu_seqlens_k=lens, max_seqlen_q=65, max_seqlen_k=65,
                             causal=True, backend="cuda"), q, k, v)


def softmax_and_layer_norm():
    x = torch.randn(37, 1000, device=dev, dtype=dt, requires_grad=True)
    grads(fastattn.softmax(x, -1, backend="cuda"), x)
    w = torch.randn(1000, device=dev, requires_grad=True)
    b = torch.randn(1000, device=dev, requires_grad=True)
    grads(fastattn.layer_norm(x, 1000, w, b, backend="cuda"), x, w, b)
    r = torch.randn_like(x, requires_grad=True)
    grads(fastattn.add_layer_norm(x, r, 1000, w, b, backend="cuda"), x, r, w, b)


if __name__ == "__main__":
    attention()
    softmax_and_layer_norm()
    torch.cuda.synchronize()
    print("gpu_sanitize: every CUDA kernel ran")
