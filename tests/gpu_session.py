"""A lent GPU's checks in one deadline-bound command (``make gpu-session``).

A task that is lent a GPU gets 15 minutes of device time in all, machine start included: about one 9-minute command
and one short one. So the checks run as stages in the order of what only a GPU can show (build the CUDA extension,
its ``gpu`` tests, compute-sanitizer, the Triton ``gpu`` tests, then benchmarks), each under its own cap and all of
them under ``--deadline``; a stage that is cut off or not reached is carried on by a second call with ``--resume``.

    python3 tests/gpu_session.py --out DIR [--deadline S] [--resume DIR] [--only STAGE,...] [--dry-run]

DIR receives three files (a device call brings back at most eight): ``summary.md`` (a line per stage: outcome,
seconds, test tallies, then the failures), ``state.json`` (what --resume reads) and ``session.tar.gz`` (every log:
a stage's output, the tests' FASTATTN_TEST_LOG lines, the benchmarks' JSON, PNG and SUMMARY.md). All three are
rewritten after every stage, so a command killed by its own time limit still returns what finished. pytest stages
log a line per finished test (tests/conftest.py), and a resumed stage runs only the tests its log lacks.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORKERS = min(12, os.cpu_count() or 4)
RESERVE_S = 15  # left at the deadline for packing the results
MIN_STAGE_S = 30  # a stage is not started with less than this left
TAIL_LINES = 25  # of a failed stage's log, in summary.md
BENCH_SHARES = {"attention": 0.55, "softmax": 0.1, "layer_norm": 0.1, "transformer": 0.15, "memory": 0.1}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def one(cmd: list[str]):
    """A stage of one command, run for all the time the stage has."""
    return lambda seconds, work: [(cmd, seconds)]


def pytest_stage(*selection: str):
    return one([PY, "-m", "pytest", "tests", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rf", "--durations=10",
                "-W", "ignore::DeprecationWarning", *(["-n", str(WORKERS)] if _has("xdist") else []), *selection])


def sanitizer() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("compute-sanitizer") or os.path.join(home, "bin", "compute-sanitizer")


def sanitize_stage(tool: str):
    return one([sanitizer(), "--tool", tool, "--error-exitcode", "1", PY, "tests/gpu_sanitize.py"])


# memcheck sees an access past a tensor only if the tensor has an allocation of its own: torch's caching allocator
# packs small tensors into shared 2 MiB blocks (a write past q would land in k, unreported).
NO_CACHING = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


def info_cmds(seconds: float, work: Path):
    return [(cmd, seconds / 3) for cmd in (["nvidia-smi"], [PY, "-m", "fastattn", "info"],
                                           [sanitizer(), "--version"])]


STARTUP_S = 12  # a benchmark script's start (import torch, fastattn, the environment line) before its budget runs


def bench_done(work: Path, name: str) -> bool:
    """Whether an earlier call's run of bench_<name>.py finished its grid (its JSON is not marked partial)."""
    try:
        return json.loads((work / "bench" / f"{name}.json").read_text()).get("partial") is False
    except (OSError, ValueError):
        return False


def bench_cmds(seconds: float, work: Path):
    """Each benchmark script not finished by an earlier call, with its share of ``seconds`` (less its start-up)
    as --budget (rows stop being added past it) and, as its timeout, that budget plus room for the row in flight;
    then summary.py, which runs even when the scripts used up the stage. Results go to <work>/bench."""
    out, cmds = work / "bench", []
    todo = {name: share for name, share in BENCH_SHARES.items() if not bench_done(work, name)}
    total = sum(todo.values())
    for name, share in todo.items():
        budget = max(10.0, share / total * (seconds - 30 - STARTUP_S * len(todo)))
        cmds.append(([PY, "-W", "ignore", f"benchmarks/bench_{name}.py", "--out", str(out), "--budget",
                      f"{budget:.0f}"], budget + 45))
    return cmds + [([PY, "benchmarks/summary.py", "--out", str(out)], 30, "always")]


def source_hash() -> str:
    """What the extension is built from: csrc/ and setup.py, by content (a copied tree's times say nothing)."""
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "csrc").rglob("*"), ROOT / "setup.py"]):
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def extension_current(session: "Session") -> bool:
    """fastattn._C imports and was built by this session from today's sources (a warm machine keeps the build of
    an earlier call, which is stale if csrc/ changed since)."""
    if session.state.get("built_from") != source_hash():
        return False
    return subprocess.run([PY, "-c", "import fastattn._C"], cwd=ROOT, capture_output=True).returncode == 0


@dataclass
class Stage:
    """One step of the session. ``commands(seconds, work)`` gives the (argv, timeout[, "always"]) tuples it runs in
    order from the repository root, with ``env`` added, in at most ``cap`` seconds (less when the deadline is
    nearer; an "always" command runs even when the others used them up); ``already(session)`` says when there is
    nothing to do; ``tests``: a pytest run (FASTATTN_TEST_LOG, tallies, resumed test by test)."""
    name: str
    cap: float
    commands: Callable[[float, Path], list]
    why: str
    env: dict = field(default_factory=dict)
    tests: bool = False
    already: Callable[["Session"], bool] | None = None


STAGES = [
    Stage("build", 240, one([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]),
          "fastattn._C for sm_90 by `pip install --no-deps --no-build-isolation -e .` (the issue's command)",
          {"FASTATTN_CUDA_ARCHS": "90", "FASTATTN_BUILD_EMULATOR": "0", "FASTATTN_BUILD_CUDA": "1"},
          already=extension_current),
    Stage("info", 60, info_cmds, "nvidia-smi, python -m fastattn info, compute-sanitizer --version"),
    Stage("cuda-tests", 180, pytest_stage("-k", "cuda"), "the CUDA C++ backend's gpu tests (it has never run)",
          tests=True),
    Stage("memcheck", 90, sanitize_stage("memcheck"), "every CUDA kernel once under compute-sanitizer memcheck",
          NO_CACHING),
    Stage("racecheck", 150, sanitize_stage("racecheck"), "the same under racecheck (shared-memory races)"),
    Stage("triton-tests", 300, pytest_stage("-k", "not cuda and not every_config and not autotuned"),
          "the Triton backend's gpu tests (dK with kv_lens failed on 2026-11-23; fixed blind since)", tests=True),
    Stage("bench", 420, bench_cmds, "every benchmark's default grid, budgets split by the time left; then SUMMARY.md"),
    Stage("triton-configs", 240, pytest_stage("-k", "(every_config or autotuned) and not cuda"),
          "every autotune config of the attention kernels, and the autotuned path", tests=True),
    Stage("check", 90, one([PY, "-W", "ignore", "-m", "fastattn", "check"]),
          "every backend x op, fp16/bf16/fp32, L=1000"),
]


class Session:
    def __init__(self, out: Path, deadline: float, resume: Path | None):
        self.out, self.deadline = out, deadline
        self.work = Path(tempfile.mkdtemp(prefix="fastattn-gpu-session-"))
        self.t0 = time.monotonic()
        self.child: subprocess.Popen | None = None
        self.current: str | None = None  # the stage in flight
        self.state = {"stages": {}, "calls": 0}
        if resume is not None:
            self.state = json.loads((resume / "state.json").read_text())
            with tarfile.open(resume / "session.tar.gz") as tar:
                tar.extractall(self.work, filter="data")
        self.state["calls"] += 1

    def left(self) -> float:
        return self.deadline - RESERVE_S - (time.monotonic() - self.t0)

    def run(self, cmd, timeout: float, log: Path, env: dict) -> str:
        """Run cmd with its output appended to log; kill its whole process group (xdist workers, the
        sanitizer's child) at the timeout."""
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}   (timeout {timeout:.0f} s)\n")
            f.flush()
            try:  # its own process group (killed whole at the timeout) in this session: the device tool ends
                # what a command leaves running unless it started a new session (setsid)
                p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, process_group=0,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **env,
                                          "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get(
                                              "PYTHONPATH"))))})
            except OSError as e:
                f.write(f"cannot start: {e}\n")
                return "failed"
            self.child = p
            try:
                rc = p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                f.write(f"\n*** killed at its time limit ({timeout:.0f} s)\n")
                return "timed out"
            finally:
                self.child = None
            f.write(f"exit status {rc}\n")
        # pytest's 5 (no test collected): a resumed stage whose every test the log already records
        return "passed" if rc == 0 or (rc == 5 and "FASTATTN_TEST_RESUME" in env) else "failed"

    def stop(self, signum, frame) -> None:
        """SIGTERM / SIGINT (the command's own time limit): end the stage in flight and keep what finished."""
        if self.child is not None:
            os.killpg(self.child.pid, signal.SIGKILL)
        if self.current is not None:
            self.state["stages"][self.current].update(outcome="timed out", note="the command was stopped")
        self.save()
        sys.exit(128 + signum)

    def stage(self, s: Stage) -> None:
        rec = self.state["stages"].setdefault(s.name, {"outcome": "not reached"})
        if s.already is not None:  # asked again in every call: a later call may find a fresh machine
            if s.already(self):
                if rec["outcome"] in ("not reached", "not selected"):
                    rec.update(outcome="skipped", note="nothing to do")
                return
        elif rec["outcome"] in ("passed", "failed", "skipped"):
            return  # done in an earlier call
        left = min(s.cap, self.left())
        if left < min(s.cap, MIN_STAGE_S):
            return
        log, env = self.work / f"{s.name}.log", dict(s.env)
        if s.tests:
            tlog = self.work / f"{s.name}.tests.log"
            env["FASTATTN_TEST_LOG"] = str(tlog)
            if tlog.exists():  # resumed: only the tests that log does not record
                env["FASTATTN_TEST_RESUME"] = str(tlog)
        t = time.monotonic()
        self.current = s.name
        print(f"[{t - self.t0:5.0f} s] {s.name}: {s.why} (at most {left:.0f} s)", flush=True)
        outcome = "passed"
        for i, (cmd, timeout, *always) in enumerate(s.commands(left, self.work)):
            remaining = left - (time.monotonic() - t)
            if always:  # from the reserve if need be (summary.py: a second)
                o = self.run(cmd, min(timeout, max(remaining, RESERVE_S / 2)), log, env)
            elif i and remaining < 5:  # no time for the next command of the stage
                outcome = "timed out"
                continue
            else:
                o = self.run(cmd, min(timeout, remaining), log, env)
            outcome = o if outcome == "passed" else outcome
        if s.already is not None and outcome == "passed":  # what extension_current compares with
            self.state["built_from"] = source_hash()
        rec.update(outcome=outcome, seconds=round(rec.get("seconds", 0) + time.monotonic() - t, 1),
                   calls=rec.get("calls", 0) + 1)
        self.current = None
        self.save()

    def tallies(self, name: str) -> dict:
        counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
        tlog = self.work / f"{name}.tests.log"
        if not tlog.exists():
            return counts
        lines = tlog.read_text().splitlines()
        for i, line in enumerate(lines):
            word = line.split(" ", 1)[0]
            if word in counts and not line.startswith(" "):
                counts[word] += 1
                if word == "failed":
                    msg = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith(" ") else ""
                    counts["failures"].append(f"{line.split()[1]}: {msg[:300]}")
        return counts

    def summary(self) -> str:
        rows = ["| stage | outcome | seconds | tests passed / failed / skipped | what |", "|---|---|---|---|---|"]
        failures, tails = [], []
        for s in STAGES:
            rec = self.state["stages"].get(s.name, {"outcome": "not reached"})
            tests = ""
            if s.tests:
                c = self.tallies(s.name)
                tests = f"{c['passed']} / {c['failed']} / {c['skipped']}"
                failures += [f"- {s.name}: {f}" for f in c["failures"]]
            rows.append(f"| {s.name} | {rec['outcome']}{' (' + rec['note'] + ')' if rec.get('note') else ''} | "
                        f"{rec.get('seconds', '')} | {tests} | {s.why} |")
            log = self.work / f"{s.name}.log"
            if rec["outcome"] in ("failed", "timed out") and log.exists():
                tails += [f"### {s.name}: the end of its log", "", "```",
                          *log.read_text(errors="replace").splitlines()[-TAIL_LINES:], "```", ""]
        head = [f"# GPU session ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, call {self.state['calls']}, "
                f"deadline {self.deadline:.0f} s, {os.cpu_count()} CPUs, {WORKERS} pytest workers)", ""]
        return "\n".join(head + rows + [""] + (["## Failed tests", ""] + failures + [""] if failures else []) + tails)

    def save(self) -> None:
        """Rewrite the three result files (after every stage: a killed command still returns what finished)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "state.json").write_text(json.dumps(self.state, indent=1))
        (self.out / "summary.md").write_text(self.summary())
        tmp = self.out / ".session.tar.gz"
        with tarfile.open(tmp, "w:gz") as tar:
            for p in sorted(self.work.rglob("*")):
                if p.is_file():
                    tar.add(p, arcname=str(p.relative_to(self.work)))
        tmp.rename(self.out / "session.tar.gz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", type=Path, required=True, help="where summary.md, state.json, session.tar.gz go")
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole command (default 540)")
    p.add_argument("--resume", type=Path, default=None, help="the --out folder of an earlier call")
    p.add_argument("--only", default=None, help="comma-separated stage names (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their commands, run nothing")
    args = p.parse_args(argv)
    names = [s.name for s in STAGES]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    if args.resume is not None and not (args.resume / "state.json").exists():
        p.error(f"--resume: {args.resume} holds no state.json")
    if args.dry_run:
        for s in STAGES:
            if s.name in only:
                print(f"{s.name} (at most {s.cap:.0f} s): {s.why}")
                env = "".join(f"{k}={v} " for k, v in s.env.items())
                for cmd, timeout, *always in s.commands(s.cap, Path("<work>")):
                    note = ", always" if always else ""
                    print(f"    {env}{' '.join(map(str, cmd))}   (timeout {timeout:.0f} s{note})")
        return 0
    session = Session(args.out, args.deadline, args.resume)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, session.stop)
    for s in STAGES:
        if s.name in only:
            session.stage(s)
        else:
            session.state["stages"].setdefault(s.name, {"outcome": "not selected"})
    session.save()
    print(session.summary())
    ok = ("passed", "skipped", "not selected")
    return 0 if all(r["outcome"] in ok for r in session.state["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
