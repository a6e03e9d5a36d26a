"""LayerNorm and add+LayerNorm (residual) over the last dim, forward and backward: GB/s of fastattn against
torch eager, torch.compile and a device-to-device copy measured in the same run.

Bytes = rows × N tensors that must be read or written once (weight, bias, their gradients and the per-row
statistics are O(N + rows) and not counted). layer_norm: fwd reads x, writes y (2); bwd reads x, dy, writes
dx (3). add_ln = LayerNorm(x + residual): fwd reads x, residual, writes y and the sum kept for backward (4);
bwd reads the sum and dy, writes dx (= dresidual, the same tensor) (3). weight and bias require grad.

    python benchmarks/bench_layer_norm.py [--quick | --full | --rehearse] [--out DIR] [--budget S]
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

NAME = "layer_norm"
FAST = ("fastattn-triton", "fastattn-cuda")
OTHERS = ("torch-eager", "torch-compile")
NOTES = ["bytes (rows·N tensors read or written once): layer_norm fwd 2 (x, y), bwd 3 (x, dy, dx); add_ln fwd 4 "
         "(x, residual, y, sum), bwd 3 (sum, dy, dx); weight/bias (requiring grad) not counted",
         "torch eager / compile of add_ln: F.layer_norm(x + residual)",
         "ratio = fastattn GB/s ÷ best other's; ÷copy = fraction of the measured copy bandwidth"]


def grid(mode: str, gpu: bool) -> list:
    cases = common.row_grid("layer_norm", (2, 3), mode, gpu)
    widths = None if mode == "full" else (1024, 4096, 16384, 32768)
    return cases + common.row_grid("add_ln", (4, 3), mode, gpu, widths=widths, other_dtypes=mode == "full")


def make(case, provider: str, device: str, mode: str):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=case.dtype, generator=g)  # noqa: E731
    x = rnd(case.rows, case.N).requires_grad_()
    res = rnd(case.rows, case.N).requires_grad_() if case.op == "add_ln" else None
    w, b = (1 + 0.1 * rnd(case.N)).requires_grad_(), (0.1 * rnd(case.N)).requires_grad_()
    dy, grads, shape = rnd(case.rows, case.N), [x, res, w, b], (case.N,)
    if provider in FAST:
        import fastattn
        backend = common.fastattn_backend(provider, device)
        if res is None:
            return (lambda: fastattn.layer_norm(x, shape, w, b, backend=backend)), dy, grads
        return (lambda: fastattn.add_layer_norm(x, res, shape, w, b, backend=backend)), dy, grads

    def ln(x, res, w, b):
        return F.layer_norm(x if res is None else x + res, shape, w, b)
    if provider == "torch-compile":
        common.require_compile(device, mode, case.compiled)
        ln = common.compiled(ln)
    return (lambda: ln(x, res, w, b)), dy, grads


def main(argv=None) -> int:
    return common.rowwise_main(NAME, common.first_paragraph(__doc__), argv, 75, grid, make, FAST, OTHERS, NOTES)


if __name__ == "__main__":
    sys.exit(main())
