"""Test set-up: Triton runs under the interpreter on CPU-only machines; outputs are poisoned with NaN.

The variables are read when fastattn's kernels are imported, so they are set here, before any test imports.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTATTN_POISON", "1")
# One config per kernel instead of benchmarking every config for every new shape bucket (tests would spend
# their time autotuning); test_gpu_autotuned runs the tuned path.
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _cuda_backend_skip():
    from fastattn import cuda  # after the variables above: fastattn reads them at import
    why = cuda.why_unavailable() if HAS_CUDA else "no CUDA GPU on this machine"
    return pytest.mark.skipif(why is not None, reason=f"backend 'cuda': {why}")


# The kernel backends every `gpu` test of an op runs for; "cuda" is skipped, with the reason, where it cannot run.
GPU_BACKENDS = ["triton", pytest.param("cuda", marks=_cuda_backend_skip())]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (larger shapes, bf16, autotuning)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    return request.param


def skip_cuda_fp32_attention(backend, dtype):
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention kernels are fp16/bf16 only (fp32 runs on backend='triton')")


def assert_case(run, case, device=DEVICE, backend="triton"):
    """Run a fastattn.testing case runner and fail with every comparison that broke the §5 rule."""
    failed = [str(r) for r in run(case, backend, device) if not r.ok]
    assert not failed, f"{case}:\n" + "\n".join(failed)
