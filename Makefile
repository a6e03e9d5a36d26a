# fastattn: set-up, tests, numerical check. `make test` and `make check` start from nothing (they create .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Pinned: torch 2.13.0 (the CPU wheel on this machine), triton 3.6.0 (as on the GPU machine),
# numpy < 2.4 (triton 3.6.0's interpreter breaks on numpy 2.4's scalar conversion).
DEPS   := torch==2.13.0 triton==3.6.0 "numpy<2.4" pybind11 pytest pytest-xdist pytest-benchmark tqdm matplotlib setuptools transformers==5.23.0

.PHONY: venv build test emu-memcheck check gpu-check gpu-session gpu-build gpu-test gpu-sanitize bench gpu-bench clean

venv: $(STAMP)

# The package is installed editable without the extension; `build` compiles fastattn._C into fastattn/.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	FASTATTN_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The CUDA extension fastattn._C (csrc/) in place, when nvcc is found: a compile error fails the build.
# Incremental: sources newer than their objects (or any header) recompile, in parallel (MAX_JOBS).
# FASTATTN_CUDA_ARCHS (default "80;90") picks the GPUs; FASTATTN_BUILD_CUDA=0 skips it.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# CPU suite: Triton kernels under the interpreter; `gpu` tests are skipped with a reason. One pytest-xdist worker
# per core, at most 4 (TEST_WORKERS; 0 = in this process): on CI's 2 cores about 12 instead of 20 minutes.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 4 ? 4 : n )))
test: build
	$(PY) -m pytest tests -q -p no:cacheprovider -W ignore::DeprecationWarning -n $(TEST_WORKERS)

# The CUDA kernels' emulated tests (tests/test_cuda_emulated.py) under AddressSanitizer and UBSan: every load and
# store of the kernels bounds-checked (fastattn._C_emu_asan, csrc/emulate/). The first report stops the run and
# is printed (--capture=sys leaves file descriptor 2 alone). libstdc++ is preloaded too, or ASan's __cxa_throw
# interceptor finds no real one and aborts at the first C++ exception. About 40 minutes on 2 cores.
CXX ?= c++
emu-memcheck: build
	FASTATTN_BUILD_EMULATOR=asan $(PY) setup.py -q build_ext --inplace
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=print_stacktrace=1 FASTATTN_CUDA_EMULATE=asan \
	  $(PY) -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider --capture=sys -W ignore::DeprecationWarning $(MEMCHECK_TESTS)

# Every backend x op against the float64 reference; prints a table, fails on any row.
check: build
	$(PY) -W ignore -m fastattn check

# On a CUDA machine that already has torch, triton, pybind11, pytest (offline, no venv): build, `gpu` tests,
# compute-sanitizer, check table, benchmarks, results under benchmarks/results/<gpu>/ (for a GPU of your own; a
# lent one, whose commands return only what they write to $OUT and stop at 10 minutes, takes `make gpu-session`).
# Its parts are meant to fit one 10-minute command each on an H200 (an estimate; not yet measured there):
#   make gpu-build gpu-test GPU_TESTS="-k cuda"    (the CUDA C++ backend's tests)
#   make gpu-sanitize                               (memcheck + racecheck over every CUDA kernel)
#   make gpu-test GPU_TESTS="-k 'not cuda'"         (the Triton backend's tests, every autotune config)
#   make gpu-bench
# pytest runs in parallel when pytest-xdist is there and reports every failure (-rf) even if cut short.
# FASTATTN_TEST_LOG=<file> writes a line per finished test as it finishes (failures with their message), so a run
# killed by a time limit still says what passed; FASTATTN_TEST_RESUME=<that file> runs only what it does not record.
# Most of a gpu test's time is Triton compiling kernel variants on the CPU: one worker per core, at most 12
# (GPU_WORKERS); the GPU has room for all their contexts.
GPU_TESTS ?=
GPU_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 4); echo $$(( n > 12 ? 12 : n )))
XDIST := $(shell $(PYTHON) -c "import xdist" 2>/dev/null && echo "-n $(GPU_WORKERS)")

# A lent GPU comes with 15 minutes of device time in all, so `make gpu-session` runs the parts above as stages in one
# command that keeps to GPU_DEADLINE seconds (default 540), what only a GPU can show first: build, the CUDA backend's
# tests, memcheck, racecheck, the Triton tests, benchmarks, every autotune config, check. It writes summary.md,
# state.json and session.tar.gz (every log) to $(OUT) (the device machine's $OUT); RESUME=<an earlier call's OUT>
# carries on with what that call did not finish (tests/gpu_session.py; --dry-run lists the commands).
GPU_DEADLINE ?= 540
OUT ?= gpu-session
gpu-session:
	$(PYTHON) tests/gpu_session.py --out "$(OUT)" --deadline $(GPU_DEADLINE) $(if $(RESUME),--resume "$(RESUME)")

gpu-check: gpu-build gpu-test gpu-sanitize
	$(PYTHON) -W ignore -m fastattn check
	$(MAKE) gpu-bench PYTHON="$(PYTHON)"

gpu-build:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m fastattn info

gpu-test:
	$(PYTHON) -m pytest tests -q -m gpu -p no:cacheprovider -rf --durations=15 $(XDIST) $(GPU_TESTS)

# memcheck sees past a tensor only if it has an allocation of its own: torch's caching allocator is turned off.
gpu-sanitize:
	for tool in memcheck racecheck; do \
	  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $$tool --error-exitcode 1 $(PYTHON) \
	  tests/gpu_sanitize.py || exit 1; done

# Every benchmark, then benchmarks/results/<gpu-name>/SUMMARY.md. BENCH_ARGS: --quick | --full, --autotune, --out DIR.
# Default grids: estimated 6-8 minutes on an H200, never measured (each script stops adding rows after its
# --budget of seconds).
BENCH_ARGS ?=
BENCH_SCRIPTS := attention softmax layer_norm transformer memory context_parallel

# A failing script does not stop the others or the summary (the target still fails at the end).
gpu-bench:
	status=0; for b in $(BENCH_SCRIPTS); do $(PYTHON) -W ignore benchmarks/bench_$$b.py $(BENCH_ARGS) || status=1; done; \
	out=$$(echo " $(BENCH_ARGS) " | sed -n 's/.* --out[= ]\([^ ]*\) .*/\1/p'); \
	$(PYTHON) benchmarks/summary.py $${out:+--out $$out} || status=1; exit $$status

# The same with the venv (on a machine without a GPU the GPU rows skip with their reason).
bench: $(STAMP)
	$(MAKE) gpu-bench PYTHON="$(abspath $(PY))"

clean:
	rm -rf $(VENV) build *.egg-info fastattn/_C*.so
