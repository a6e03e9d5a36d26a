"""CUDA C++ softmax (csrc/softmax.cu): the ``forward`` / ``backward`` of fastattn.triton.softmax, same arguments."""
from __future__ import annotations

import torch

from ..triton.attention import _bcast_strides
from . import check_cuda, device_ctx, dtype_code, extension, ptr, stream


def forward(x2d: torch.Tensor, y2d: torch.Tensor, mask4d, scale: float, lead: tuple[int, int, int]):
    """x2d, y2d: contiguous [R, N]. mask4d: None or a [D0|1, D1|1, D2|1, N] float view (stride-1 last dim)
    broadcast over the leading dims ``lead`` = (D0, D1, D2) with D0·D1·D2 = R."""
    C = extension(x2d)
    check_cuda(("x", x2d), ("y", y2d), ("mask", mask4d))
    R, N = x2d.shape
    if mask4d is not None and mask4d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        mask4d = mask4d.float()  # float64 masks: the kernel reads fp16 / bf16 / fp32
    strides = _bcast_strides(mask4d)[:3]
    with device_ctx(x2d):
        C.softmax_fwd(x=x2d.data_ptr(), y=y2d.data_ptr(), mask=ptr(mask4d), rows=R, cols=N,
                      x_dtype=dtype_code(x2d, "x"), y_dtype=dtype_code(y2d, "dtype"),
                      mask_dtype=dtype_code(mask4d, "mask") if mask4d is not None else C.FLOAT32,
                      lead1=lead[1], lead2=lead[2], mask_s0=strides[0], mask_s1=strides[1], mask_s2=strides[2],
                      scale=float(scale), stream=stream(x2d))


def backward(y2d, dy2d, dx2d, dz2d, scale: float):
    """dx2d = scale·dz; dz2d (fp32 [R, N] or None) receives dz for a mask gradient."""
    C = extension(y2d)
    check_cuda(("y", y2d), ("dy", dy2d), ("dx", dx2d), ("dz", dz2d))
    R, N = y2d.shape
    dy2d = dy2d.to(y2d.dtype).contiguous()  # the kernel reads dy in y's dtype
    with device_ctx(y2d):
        C.softmax_bwd(y=y2d.data_ptr(), dy=dy2d.data_ptr(), dx=dx2d.data_ptr(), dz=ptr(dz2d), rows=R, cols=N,
                      y_dtype=dtype_code(y2d, "y"), dx_dtype=dtype_code(dx2d, "dx"), scale=float(scale),
                      stream=stream(y2d))
