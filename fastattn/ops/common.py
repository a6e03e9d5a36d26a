"""Helpers shared by every op: output allocation (poisoned in tests) and argument checks that name the argument."""
from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Backends that run fastattn.reference: "torch" computes fp16/bf16 in fp32 and rounds each result to the input's
# dtype once, as torch's own kernels accumulate (in fp16, a LayerNorm's variance or a scaled score overflows);
# "reference" runs it in the input dtype, the baseline of DESIGN.md §5 (fastattn.testing).
REFERENCE_BACKENDS = ("torch", "reference")


def upcast(use: str, t: Tensor | None) -> Tensor | None:
    """``t`` as backend ``use`` computes with it: fp16/bf16 -> fp32 on "torch", otherwise unchanged."""
    if use == "torch" and t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def empty(shape, *, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Uninitialised output; filled with NaN when FASTATTN_POISON=1 so an element a kernel forgets shows up."""
    dtype = dtype or like.dtype
    if os.environ.get("FASTATTN_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def empty_like(t: Tensor) -> Tensor:
    """Like torch.empty_like (same strides for a dense tensor), poisoned as :func:`empty`."""
    out = torch.empty_like(t)
    if os.environ.get("FASTATTN_POISON") == "1":
        out.fill_(float("nan"))
    return out


def check_tensor(t, name: str, *, dim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


def check_same(ref: Tensor, ref_name: str, t: Tensor, name: str, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def kernel_dtype_problem(t: Tensor, name: str, backend: str) -> str | None:
    """Why ``backend``'s kernels cannot take ``t``'s dtype, or None."""
    if t.dtype not in KERNEL_DTYPES:
        return (f"{name}: backend {backend!r} supports float16, bfloat16 and float32, got {t.dtype} "
                "(use backend='torch' for other dtypes)")
    if backend == "triton" and t.dtype == torch.bfloat16 and not t.is_cuda:
        # triton 3.6's interpreter runs bf16 kernels but returns garbage: refuse rather than answer wrongly
        return (f"{name}: bfloat16 is not supported by the Triton interpreter (CPU); use a GPU, "
                "float16/float32, or backend='torch'")
    return None


# Devices whose torch.autocast policy the ops copy: CUDA's runs LayerNorm and softmax in fp32 and SDPA in the
# autocast dtype (CPU autocast leaves all three alone, as the ops then do). A tuple, so that tests can add "cpu".
AUTOCAST_DEVICES = ("cuda",)


def autocast_to(t: Tensor | None, policy: str) -> torch.dtype | None:
    """The dtype torch.autocast would cast ``t`` to before an op of ``policy`` ("fp32": LayerNorm, softmax;
    "lower": attention, as SDPA), or None: autocast off on its device, or ``t`` not a tensor it casts (not
    floating, float64, or already that dtype)."""
    if not isinstance(t, Tensor) or t.device.type not in AUTOCAST_DEVICES:
        return None
    if not torch.is_autocast_enabled(t.device.type) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    to = torch.float32 if policy == "fp32" else torch.get_autocast_dtype(t.device.type)
    return to if t.dtype != to else None


def forward_ad(t: Tensor | None) -> bool:
    """Whether forward-mode AD sees ``t`` (torch.func.jvp / jacfwd, or a torch.autograd.forward_ad dual tensor).
    torch.library custom ops drop tangents without a word (a zero JVP), so the kernels must not take such calls:
    backend "torch" (plain torch ops) differentiates them."""
    if t is None or torch.compiler.is_compiling():
        return False
    top = torch._C._functorch.peek_interpreter_stack()
    if top is not None and top.key() == torch._C._functorch.TransformType.Jvp:
        return True
    return fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None


def kernels_take(*named: tuple[Tensor | None, str]):
    """For dispatch.select: backend -> whether its kernels take these (tensor, name) pairs (dtypes, no forward-mode
    AD)."""
    return lambda backend: all(t is None or (kernel_dtype_problem(t, name, backend) is None and not forward_ad(t))
                               for t, name in named)


def check_kernel_dtype(t: Tensor, name: str, backend: str) -> None:
    """Raise where ``backend``'s kernels cannot take ``t``: its dtype, or forward-mode AD on it."""
    why = kernel_dtype_problem(t, name, backend)
    if why:
        raise TypeError(why)
    check_no_forward_ad(t, name, backend)


def check_no_forward_ad(t: Tensor | None, name: str, backend: str) -> None:
    if forward_ad(t):
        raise NotImplementedError(f"{name}: forward-mode AD (torch.func.jvp, forward_ad dual tensors) runs on "
                                  f"backend 'torch' only; backend {backend!r}'s kernels carry no tangent")


def lastdim_contiguous(t: Tensor) -> Tensor:
    """Kernels index the last dim with stride 1; everything else is passed as strides."""
    return t if t.stride(-1) == 1 else t.contiguous()
