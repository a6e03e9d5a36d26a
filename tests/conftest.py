"""Test set-up: Triton runs under the interpreter on CPU-only machines, the CUDA C++ kernels run on CPU tensors
under the CPU emulator (fastattn._C_emu, tests/test_cuda_emulated.py); outputs are poisoned with NaN.

The variables are read when fastattn's kernels are imported, so they are set here, before any test imports.
"""
import os
import shutil
import subprocess
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTATTN_POISON", "1")
os.environ.setdefault("FASTATTN_CUDA_EMULATE", "1")  # CPU tensors only: CUDA tensors always run fastattn._C
# One config per kernel instead of benchmarking every config for every new shape bucket (tests would spend
# their time autotuning); test_gpu_autotuned runs the tuned path.
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _cuda_backend_skip(device):
    from fastattn import cuda  # after the variables above: fastattn reads them at import
    why = cuda.why_unavailable(device) if device == "cpu" or HAS_CUDA else "no CUDA GPU on this machine"
    return pytest.mark.skipif(why is not None, reason=f"backend 'cuda': {why}")


# The kernel backends every `gpu` test of an op runs for; "cuda" is skipped, with the reason, where it cannot run.
GPU_BACKENDS = ["triton", pytest.param("cuda", marks=_cuda_backend_skip("cuda"))]
# The same for tests on DEVICE (on the CPU: Triton's interpreter, the CUDA kernels under the CPU emulator).
KERNEL_BACKENDS = ["triton", pytest.param("cuda", marks=_cuda_backend_skip(DEVICE))]


@pytest.fixture(autouse=True)
def _seeded_rng(request):
    """Each test starts torch's global RNG from a seed of its own node id: a test that draws from it sees the same
    inputs in every run, whatever ran before it in its pytest-xdist worker (its failures reproduce)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# GPU sessions are short and may be cut off: FASTATTN_TEST_LOG=<file> appends a line per finished test as it finishes
# ("passed|failed|skipped <node id> <seconds>s", a failure followed by its message, indented), so a run killed
# by a time limit still says what passed and what failed; FASTATTN_TEST_RESUME=<such a file> deselects the tests
# it records, so the next run carries on with the rest. With pytest-xdist only the controller writes.
TEST_LOG = os.environ.get("FASTATTN_TEST_LOG")
TEST_RESUME = os.environ.get("FASTATTN_TEST_RESUME")
_LOG_WRITER = []


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (larger shapes, bf16, autotuning)")
    if TEST_LOG and not hasattr(config, "workerinput"):
        _LOG_WRITER.append(open(TEST_LOG, "a", buffering=1))


def pytest_runtest_logreport(report):
    if not _LOG_WRITER or (report.when != "call" and not report.failed and not report.skipped):
        return
    if report.when == "teardown" and report.skipped:
        return
    line = f"{report.outcome} {report.nodeid} {report.duration:.1f}s"
    if report.when != "call":
        line += f" (in {report.when})"
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        line += "\n" + "\n".join("    " + m for m in message.splitlines()[:40])
    _LOG_WRITER[0].write(line + "\n")


def logged_tests(path):
    """Node ids that a FASTATTN_TEST_LOG file records as finished."""
    with open(path) as f:
        rows = [line.split() for line in f if not line.startswith(" ")]  # indented: a failure's message
    return {row[1] for row in rows if len(row) > 1 and row[0] in ("passed", "failed", "skipped")}


def pytest_collection_modifyitems(config, items):
    if TEST_RESUME and os.path.exists(TEST_RESUME):
        done = logged_tests(TEST_RESUME)
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = [item for item in items if item.nodeid not in done]
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


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    return request.param


def skip_cuda_fp32_attention(backend, dtype):
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention kernels are fp16/bf16 only (fp32 runs on backend='triton')")


def assert_case(run, case, device=DEVICE, backend="triton"):
    """Run a fastattn.testing case runner and fail with every comparison that broke the §5 rule."""
    failed = [str(r) for r in run(case, backend, device) if not r.ok]
    assert not failed, f"{case}:\n" + "\n".join(failed)


def _host_compiler(kind):
    """The host C++ compiler ("c++") or nvcc ("nvcc"), or None."""
    if kind == "c++":
        found = (shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c)
        return next((c for c in found if c), None)
    return os.environ.get("NVCC") or shutil.which("nvcc") or next(
        (p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),)
         if os.path.exists(p)), None)


def cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime.h), or None."""
    nvcc = _host_compiler("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and os.path.dirname(os.path.dirname(
        os.path.realpath(nvcc)))]
    return next((os.path.join(h, "include") for h in homes
                 if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)


def host_driver(kind, source, tmp_path_factory, flags=(), tag=""):
    """Build tests/<source> (a driver of csrc headers: command lines in, output lines out) with the host C++
    compiler (and extra ``flags``) or with nvcc as CUDA source (the __host__ __device__ build), and return a
    function that sends it command lines and returns its output lines (``check=False``: the CompletedProcess).
    Skips when that compiler is missing."""
    cc = _host_compiler(kind)
    if cc is None:
        pytest.skip(f"no {kind} compiler on this machine to build tests/{source.name}")
    exe = tmp_path_factory.mktemp(source.stem) / f"{source.stem}_{kind.replace('+', 'x')}{tag}"
    lang = ["-x", "cu"] if kind == "nvcc" else []
    cmd = [cc, *lang, "-O2", "-std=c++17", "-I", str(source.parents[1] / "csrc"), str(source), "-o", str(exe),
           *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"

    def run(lines, check=True):
        r = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=check)
        return r.stdout.splitlines() if check else r

    return run
