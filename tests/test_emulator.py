"""The CPU emulator of csrc/emulate/ itself: that its schedules expose the synchronisation bugs a GPU would punish
(a stage refilled while another warp reads it, a stage read before its cp.async group landed, a __shared__
reduction buffer rewritten before the last round's readers are done), that it raises what faults or hangs on the
hardware (misaligned or non-shared cp.async / ldmatrix addresses, misaligned vector loads, divergent warp
collectives, copies left in flight, deadlocks), and that its AddressSanitizer build reports out-of-bounds reads of
global and of dynamic shared memory. tests/emulator_host.cpp holds the kernels (each bug behind a switch); the right
versions must give the exact answer under every schedule."""
import re
from pathlib import Path

import numpy as np
import pytest

import conftest

DRIVER = Path(__file__).resolve().parent / "emulator_host.cpp"
ORDERS = ["forward", "reverse", "shuffle", "first-ahead", "last-ahead"]
SCHEDULES = [(o, c, seed) for o in ORDERS for c in ("eager", "lazy") for seed in ((1, 2) if o == "shuffle" else (0,))]
THREADS, TILES, TILE = 128, 6, 512


def _flags():
    inc = conftest.cuda_include()
    if inc is None:
        pytest.skip("the CUDA toolkit's headers (cuda_runtime.h) are not on this machine")
    return ["-DFASTATTN_EMULATE", "-I", inc]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return conftest.host_driver("c++", DRIVER, tmp_path_factory, flags=_flags())


def values(line):
    return np.array([int(b) for b in line.split()], dtype=np.uint32).view(np.float32)


def pipeline_expected():
    tiles = np.arange(TILES)[:, None] * 1000.0 + np.arange(TILE)[None, :]
    chunk = (np.arange(THREADS) + 64) % THREADS
    return np.array([tiles[:, 4 * c:4 * c + 4].sum() for c in chunk])


def reduce_expected():
    return np.repeat([(r + 1) * THREADS * (THREADS - 1) / 2 for r in range(4)], THREADS)


def run_pipeline(driver, trailing, waitn):
    lines = driver([f"pipeline {o} {c} {s} {trailing} {waitn}" for o, c, s in SCHEDULES])
    return {sched: np.array_equal(values(line), pipeline_expected()) for sched, line in zip(SCHEDULES, lines)}


def test_double_buffer_right_under_every_schedule(driver):
    right = run_pipeline(driver, trailing=1, waitn=1)
    assert all(right.values()), [s for s, ok in right.items() if not ok]


def test_refilling_a_stage_before_the_barrier_shows(driver):
    """No __syncthreads between the last read of a stage and its refill: eager copies overwrite it under readers."""
    right = run_pipeline(driver, trailing=0, waitn=1)
    assert not any(ok for (o, c, s), ok in right.items() if c == "eager")


def test_reading_a_stage_before_its_wait_shows(driver):
    """wait_group 2 instead of 1: the stage is read before its group landed; lazy copies leave stale data."""
    right = run_pipeline(driver, trailing=1, waitn=2)
    assert not any(ok for (o, c, s), ok in right.items() if c == "lazy")


def test_block_reduction_race_shows_when_a_warp_runs_ahead(driver):
    orders = [(o, s) for o, c, s in SCHEDULES if c == "eager"]
    for first_sync in (1, 0):
        lines = driver([f"reduce {o} {s} {first_sync}" for o, s in orders])
        right = {o: np.array_equal(values(line), reduce_expected()) for (o, s), line in zip(orders, lines)}
        if first_sync:
            assert all(right.values()), right
        else:  # round-robin orders keep the warps in step and miss it; a warp running ahead does not
            assert not right["first-ahead"] and not right["last-ahead"], right


# What faults (or hangs) on the hardware raises, naming the thread and the rule, under every kind of schedule.
FAULTS = {
    "cp_async_dst_misaligned": r"thread \d+ of block \(0, 0, 0\) cp\.async destination at shared byte offset \d+ "
                               r"is not 16-byte aligned \(misaligned address\)",
    "cp_async_src_misaligned": r"cp\.async source 0x[0-9a-f]+ is not 16-byte aligned",
    "cp_async_dst_outside_shared": r"thread 31 of block \(0, 0, 0\) cp\.async destination at shared byte offset "
                                   r"1024 lies outside the launch's 1024 bytes of dynamic shared memory",
    "cp_async_in_flight": r"exited with cp\.async copies in flight",
    "ldmatrix_misaligned": r"thread 5 of block \(0, 0, 0\) ldmatrix row address at shared byte offset 82 is not "
                           r"16-byte aligned",
    "ldmatrix_outside_shared": r"ldmatrix\.trans row address (0x[0-9a-f]+|at shared byte offset -?\d+) lies outside "
                               r"the launch's 1024 bytes",
    "divergent_collective": r"is at (ldmatrix|mma \(f16\)) while lane \d+ of its warp is at (ldmatrix|mma \(f16\)) "
                            r"\(a warp collective needs the whole warp converged\)",
    "shfl_from_exited_lane": r"thread 2 of block \(0, 0, 0\) reads lane 3 of its warp in shfl\.sync, which has exited",
    "vector_load_misaligned": r"thread \d+ of block \(0, 0, 0\) vector load of 16 bytes at 0x[0-9a-f]+ is not aligned "
                              r"to its size \(misaligned address\)",
    "deadlock": r"deadlock in block \(0, 0, 0\)",
}
FAULT_SCHEDULES = [("forward", "eager", 0), ("shuffle", "lazy", 2), ("last-ahead", "lazy", 0)]


def test_what_faults_on_hardware_raises(driver):
    names = ["keeps_the_rules", *FAULTS]
    lines = driver([f"fault {n} {o} {c} {s}" for o, c, s in FAULT_SCHEDULES for n in names])
    for i, (o, c, s) in enumerate(FAULT_SCHEDULES):
        got = dict(zip(names, lines[i * len(names):(i + 1) * len(names)]))
        assert got.pop("keeps_the_rules") == "no error", (o, c)
        for name, line in got.items():
            assert line.startswith("error: ") and re.search(FAULTS[name], line), f"{name} under {o}/{c}: {line!r}"


@pytest.fixture(scope="module")
def asan_driver(tmp_path_factory):
    return conftest.host_driver("c++", DRIVER, tmp_path_factory, tag="_asan",
                                flags=[*_flags(), "-fsanitize=address", "-fno-omit-frame-pointer"])


def test_asan_build_runs_clean_and_reports_out_of_bounds(asan_driver):
    """Under AddressSanitizer the fibers' stack switches, and the faulting kernels (their faulting accesses
    skipped), raise no false report; a read one float past a global array, or past the dynamic shared memory a
    launch asked for, is reported and fails the process."""
    ok = asan_driver([f"pipeline {o} {c} {s} 1 1" for o, c, s in SCHEDULES] + ["reduce first-ahead 0 1"] +
                     [f"fault {n} last-ahead lazy 0" for n in ["keeps_the_rules", *FAULTS]], check=False)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "AddressSanitizer" not in ok.stderr
    # (the bytes around dynamic shared memory are poisoned by the emulator: "use-after-poison")
    for cmd, kind in (("oob_global", "heap-buffer-overflow"), ("oob_shared", "use-after-poison")):
        r = asan_driver([cmd], check=False)
        assert r.returncode != 0 and f"SUMMARY: AddressSanitizer: {kind}" in r.stderr and f"in {cmd}(" in r.stderr, \
            r.stderr[-3000:]
