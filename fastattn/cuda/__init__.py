"""Python side of the CUDA C++ extension ``fastattn._C``: loading it (lazily), telling whether it can run here
(:func:`available`, :func:`why_unavailable`), and the tensor → integer marshalling the op modules share
(data pointers, dtype codes, the current stream). One module per op: attention.py, softmax.py, layer_norm.py,
each with the ``forward`` / ``backward`` functions of the Triton module of the same name.

``FASTATTN_CUDA_EMULATE=1`` runs the same kernels on CPU tensors, compiled by the host compiler against a CPU
emulator of the CUDA features they use (``fastattn._C_emu``, csrc/emulate/): slow, for tests on machines without
a GPU, as ``TRITON_INTERPRET=1`` is for the Triton kernels. ``FASTATTN_CUDA_EMULATE=asan`` runs them in
``fastattn._C_emu_asan`` instead, the emulator under AddressSanitizer and UBSan (`make emu-memcheck`; Python
must start with libasan preloaded). CUDA tensors always go to ``fastattn._C``.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from ..triton import device_ctx  # noqa: F401  (launch on the tensors' GPU; shared with the Triton backend)

REBUILD = "pip install --no-deps --no-build-isolation -e ."


_EMULATORS = {"1": "_C_emu", "asan": "_C_emu_asan"}  # FASTATTN_CUDA_EMULATE -> module


def emulation_enabled() -> bool:
    """FASTATTN_CUDA_EMULATE=1 (or asan): CPU tensors run the CUDA kernels under the CPU emulator."""
    return os.environ.get("FASTATTN_CUDA_EMULATE", "0") in _EMULATORS


def emulator_name() -> str:
    """The emulator module FASTATTN_CUDA_EMULATE selects: _C_emu, or _C_emu_asan (sanitized)."""
    return _EMULATORS.get(os.environ.get("FASTATTN_CUDA_EMULATE", "1"), "_C_emu")


def _asan_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _load(name: str = "_C"):
    """-> (module fastattn.<name>, None) or (None, why it cannot be imported)."""
    full = f"fastattn.{name}"
    if name.endswith("_asan") and not _asan_loaded():  # importing it would abort the process
        return None, (f"{full} is built with AddressSanitizer: start Python with LD_PRELOAD=\"$(c++ "
                      f"-print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)\" (make emu-memcheck does)")
    try:
        return importlib.import_module(full), None
    except ModuleNotFoundError as e:
        if e.name != full:
            return None, f"the CUDA extension {full} failed to import: {e}"
        return None, (f"the CUDA extension {full} is not built (nvcc was not found when fastattn was installed, "
                      f"or FASTATTN_BUILD_CUDA=0); rebuild with nvcc on PATH: `{REBUILD}`")
    except ImportError as e:  # built, but does not load (missing symbol, wrong Python, ...)
        return None, f"the CUDA extension {full} failed to import: {e}; rebuild it: `{REBUILD}`"


def extension(t: Optional[torch.Tensor] = None):
    """The ``fastattn._C`` module, or for a CPU tensor ``t`` (FASTATTN_CUDA_EMULATE=1) the emulator build
    ``fastattn._C_emu``; RuntimeError saying why when it cannot be imported."""
    mod, why = _load(emulator_name() if t is not None and not t.is_cuda and emulation_enabled() else "_C")
    if mod is None:
        raise RuntimeError(why)
    return mod


def _runs_on(arch: str, cc: tuple[int, int]) -> bool:
    """Whether a cubin for ``arch`` ("80", "90a", "100f") runs on a device of compute capability ``cc``."""
    suffix = arch[-1] if arch[-1] in "af" else ""
    num = arch.rstrip("af")
    major, minor = int(num[:-1]), int(num[-1])
    if suffix == "a":  # architecture-specific features: that exact device only
        return cc == (major, minor)
    return cc[0] == major and cc[1] >= minor


@functools.lru_cache(maxsize=None)
def _why_device(index: int) -> Optional[str]:
    archs = extension().compiled_archs()
    cc = torch.cuda.get_device_capability(index)
    if any(_runs_on(a, cc) for a in archs):
        return None
    have = ", ".join(f"sm_{a}" for a in archs) or "no architecture"
    return (f"fastattn._C was built for {have} but cuda:{index} ({torch.cuda.get_device_name(index)}) is "
            f"sm_{cc[0]}{cc[1]}; rebuild with FASTATTN_CUDA_ARCHS=\"{cc[0]}{cc[1]}\" `{REBUILD}`")


def why_unavailable(device: torch.device | str | int | None = None) -> Optional[str]:
    """Why ``backend="cuda"`` cannot run on ``device`` (default: the current CUDA device); None when it can."""
    if device is not None and not isinstance(device, int) and torch.device(device).type == "cpu":
        if not emulation_enabled():
            return ("the inputs are on the CPU: the CUDA kernels run on CUDA tensors, or on CPU tensors under the CPU "
                    "emulator with FASTATTN_CUDA_EMULATE=1")
        return _load(emulator_name())[1]
    _, why = _load()
    if why:
        return why
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build})"
    if device is None or isinstance(device, int):
        index = torch.cuda.current_device() if device is None else device
    else:
        device = torch.device(device)
        if device.type != "cuda":
            return f"fastattn._C runs on CUDA devices, not {device}"
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _why_device(index)


def available(device: torch.device | str | int | None = None) -> bool:
    """Whether ``backend="cuda"`` can run on ``device`` (default: the current CUDA device)."""
    return why_unavailable(device) is None


# --------------------------------------------------------------------------------------------- marshalling
_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # csrc/dtype.h RowDType


def dtype_code(t: torch.Tensor, name: str, dtypes=tuple(_CODES)) -> int:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: backend 'cuda' supports {names}, got {t.dtype}")
    return _CODES[t.dtype]


def check_cuda(*named: tuple[str, Optional[torch.Tensor]]) -> None:
    """Every given tensor is on the same CUDA device (or all on the CPU, under the emulator)."""
    first = None
    for name, t in named:
        if t is None:
            continue
        if not t.is_cuda and not (t.device.type == "cpu" and emulation_enabled()):
            raise ValueError(f"{name}: backend 'cuda' needs CUDA tensors, got a tensor on {t.device}")
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}")


def ptr(t: Optional[torch.Tensor]) -> int:
    """Data pointer as an int, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The current stream of t's device, as the integer value of its cudaStream_t (0 under the emulator)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0
