"""``python -m fastattn demo``: train the reference Transformer to reverse padded variable-length sequences,
fused (fastattn kernels) and unfused (fastattn.reference) from the same seed, and print both loss curves.

Task: src = x_1 … x_n (n random, right-padded), tgt = BOS x_n … x_1 EOS; teacher forcing, cross-entropy over
non-pad target tokens. Dropout is 0 so that the two runs differ only by the kernels' rounding.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

PAD, BOS, EOS, FIRST = 0, 1, 2, 3

SIZES = {  # d_model, heads, layers, ffn, max_len, batch, vocab, default steps
    "tiny": (32, 2, 1, 64, 8, 16, 12, 30),
    "small": (64, 4, 2, 128, 12, 32, 16, 200),
    "medium": (256, 8, 3, 1024, 128, 64, 64, 300),
}


def batch(size: int, max_len: int, vocab: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.randint(max(1, max_len // 2), max_len + 1, (size,), generator=g)
    src = torch.randint(FIRST, vocab, (size, max_len), generator=g)
    pos = torch.arange(max_len)
    src[pos[None, :] >= lens[:, None]] = PAD
    tgt = torch.full((size, max_len + 2), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    for b in range(size):
        n = int(lens[b])
        tgt[b, 1:n + 1] = src[b, :n].flip(0)
        tgt[b, n + 1] = EOS
    return src.to(device), tgt.to(device)


def train(fused: bool, size: str, steps: int, device, state=None):
    from .nn import Transformer

    d, heads, layers, ffn, max_len, bsz, vocab, _ = SIZES[size]
    torch.manual_seed(0)
    model = Transformer(vocab, vocab, d_model=d, nhead=heads, num_encoder_layers=layers, num_decoder_layers=layers,
                        dim_feedforward=ffn, dropout=0.0, max_len=max_len + 2, pad_id=PAD, fused=fused).to(device)
    if state is not None:
        model.load_state_dict(state)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses, t_total = [], 0.0
    for _ in range(steps):
        src, tgt = batch(bsz, max_len, vocab, g, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(src, tgt[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tgt[:, 1:].reshape(-1),
                                           ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_total += time.perf_counter() - t0
        losses.append(loss.item())
    return losses, t_total / steps, state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="model/data size (default: small on CPU, medium on a GPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--every", type=int, default=None, help="print every N steps")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("medium" if device.type == "cuda" else "small")
    steps = args.steps or SIZES[size][-1]
    every = args.every or max(1, steps // 15)
    backend = "Triton kernels" if device.type == "cuda" else "the torch fallback (no GPU: both runs use PyTorch ops)"
    print(f"reverse task, size {size}, {steps} steps on {device}; fused = fastattn ops ({backend}), "
          f"unfused = fastattn.reference")
    fused, t_fused, state = train(True, size, steps, device)
    unfused, t_unfused, _ = train(False, size, steps, device, state)
    print(f"{'step':>6} {'fused':>10} {'unfused':>10} {'|diff|':>10}")
    for i in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        print(f"{i + 1:>6} {fused[i]:>10.4f} {unfused[i]:>10.4f} {abs(fused[i] - unfused[i]):>10.2e}")
    if device.type == "cuda":  # CPU timings of two PyTorch paths say nothing about the kernels
        print(f"time per step: fused {t_fused * 1e3:.1f} ms, unfused {t_unfused * 1e3:.1f} ms, "
              f"speed-up {t_unfused / t_fused:.2f}x")
    return 0
