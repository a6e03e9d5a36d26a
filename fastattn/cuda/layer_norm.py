"""CUDA C++ LayerNorm (csrc/layer_norm.cu): the ``forward`` / ``backward`` / ``num_partials`` of
fastattn.triton.layer_norm, same arguments. dw/db: one fp32 partial row per block, summed by the caller."""
from __future__ import annotations

import torch

from . import check_cuda, device_ctx, dtype_code, extension, ptr, stream

MAX_PARTIAL_FLOATS = 32 << 20  # cap on G·N for each partial buffer (128 MiB of fp32)


def num_partials(x: torch.Tensor, rows: int) -> int:
    """G, the number of backward blocks (and partial dw/db rows): enough blocks to fill every SM."""
    if not x.is_cuda:
        return max(1, min(rows, 8))
    N = x.shape[-1]
    threads = extension().layer_norm_bwd_threads(dtype=dtype_code(x, "x"), cols=N)
    per_sm = min(8, max(1, 2048 // threads))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(rows, sms * per_sm, max(sms, MAX_PARTIAL_FLOATS // N)))


def forward(x2d, res2d, w, b, y2d, s2d, mean, rstd, eps: float):
    """Rows of x2d (+ res2d, stored to s2d) normalised into y2d; saves mean and rstd (fp32 [R])."""
    C = extension(x2d)
    check_cuda(("x", x2d), ("residual", res2d), ("weight", w), ("bias", b), ("y", y2d), ("s", s2d),
               ("mean", mean), ("rstd", rstd))
    R, N = x2d.shape
    code = dtype_code(x2d, "x")
    with device_ctx(x2d):
        C.layer_norm_fwd(x=x2d.data_ptr(), residual=ptr(res2d), w=ptr(w), b=ptr(b), y=y2d.data_ptr(), s=ptr(s2d),
                         mean=mean.data_ptr(), rstd=rstd.data_ptr(), rows=R, cols=N, dtype=code,
                         w_dtype=dtype_code(w, "weight") if w is not None else code,
                         b_dtype=dtype_code(b, "bias") if b is not None else code, eps=float(eps),
                         stream=stream(x2d))


def backward(s2d, w, dy2d, dsum2d, dx2d, mean, rstd, dw_partial, db_partial):
    """dx2d from the normalised rows s2d; dw/db partial sums ([G, N] fp32, zeroed, or None) per block."""
    C = extension(s2d)
    check_cuda(("s", s2d), ("weight", w), ("dy", dy2d), ("dsum", dsum2d), ("dx", dx2d), ("mean", mean),
               ("rstd", rstd), ("dw_partial", dw_partial), ("db_partial", db_partial))
    R, N = s2d.shape
    code = dtype_code(s2d, "s")
    # the kernel reads dy and dsum in s's dtype
    dy2d = dy2d.to(s2d.dtype).contiguous()
    dsum2d = dsum2d.to(s2d.dtype).contiguous() if dsum2d is not None else None
    G = dw_partial.shape[0] if dw_partial is not None else num_partials(s2d, R)
    with device_ctx(s2d):
        C.layer_norm_bwd(s=s2d.data_ptr(), w=ptr(w), dy=dy2d.data_ptr(), dsum=ptr(dsum2d), dx=dx2d.data_ptr(),
                         mean=mean.data_ptr(), rstd=rstd.data_ptr(), dw_partial=ptr(dw_partial),
                         db_partial=ptr(db_partial), rows=R, cols=N, dtype=code,
                         w_dtype=dtype_code(w, "weight") if w is not None else code, partials=G,
                         stream=stream(s2d))
