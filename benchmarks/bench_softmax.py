"""Softmax over the last dim, forward and backward: GB/s of fastattn against torch eager, torch.compile and a
device-to-device copy measured in the same run.

Bytes = tensors that must be read or written once: forward reads x and writes y (2 tensors); backward reads
y and dy and writes dx (3 tensors). Rows × N ≈ 2^28 elements (0.5 GB in bf16) on the GPU.

    python benchmarks/bench_softmax.py [--quick | --full | --rehearse] [--out DIR] [--budget S]
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402

import common  # noqa: E402

NAME = "softmax"
FAST = ("fastattn-triton", "fastattn-cuda")
OTHERS = ("torch-eager", "torch-compile")
NOTES = ["bytes: fwd reads x, writes y (2·rows·N elements); bwd reads y, dy, writes dx (3·rows·N)",
         "ratio = fastattn GB/s ÷ best other's; ÷copy = fraction of the measured copy bandwidth"]


def grid(mode: str, gpu: bool) -> list:
    return common.row_grid("softmax", (2, 3), mode, gpu)


def make(case, provider: str, device: str, mode: str):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.rows, case.N, device=device, dtype=case.dtype, generator=g).requires_grad_()
    dy = torch.randn(case.rows, case.N, device=device, dtype=case.dtype, generator=g)
    if provider in FAST:
        import fastattn
        backend = common.fastattn_backend(provider, device)
        return (lambda: fastattn.softmax(x, -1, backend=backend)), dy, [x]
    if provider == "torch-eager":
        return (lambda: torch.softmax(x, -1)), dy, [x]
    common.require_compile(device, mode, case.compiled)
    fn = common.compiled(lambda t: torch.softmax(t, -1))
    return (lambda: fn(x)), dy, [x]


def main(argv=None) -> int:
    return common.rowwise_main(NAME, common.first_paragraph(__doc__), argv, 50, grid, make, FAST, OTHERS, NOTES)


if __name__ == "__main__":
    sys.exit(main())
