"""tests/gpu_session.py on the CPU: its pytest stages select every `gpu` test exactly once, it keeps to its
deadline, returns its three files, and a resumed call carries on where the first stopped."""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import gpu_session  # noqa: E402
from gpu_session import PY, Stage, one  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _collect(*args):
    r = subprocess.run([PY, "-m", "pytest", "tests", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {line for line in r.stdout.splitlines() if "::" in line}


def test_pytest_stages_select_every_gpu_test_once():
    everything = _collect()
    picked = {}
    for s in gpu_session.STAGES:
        if s.tests:
            (cmd, _), = s.commands(s.cap, Path("work"))
            picked[s.name] = _collect("-k", cmd[cmd.index("-k") + 1])
            assert picked[s.name], f"stage {s.name} selects no test"
    names = list(picked)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not picked[a] & picked[b], f"{a} and {b} both run {sorted(picked[a] & picked[b])[:3]}"
    missed = everything - set().union(*picked.values())
    assert not missed, f"no stage runs {sorted(missed)[:5]} ({len(missed)} in all)"
    assert all("cuda" in t for t in picked["cuda-tests"]) and len(picked["cuda-tests"]) > 100


# A fake pytest stage: the line per finished test that tests/conftest.py writes to FASTATTN_TEST_LOG, and a note of
# the FASTATTN_TEST_RESUME it was given; then exit 1 (a test failed), or hang (a run cut off by its time limit).
FAKE_TESTS = """
import os, sys, time
with open(os.environ["FASTATTN_TEST_LOG"], "a") as f:
    f.write("passed tests/x.py::{name}_a 0.1s\\n")
    if "{hang}" == "no":
        f.write("failed tests/x.py::{name}_b 0.1s\\n    AssertionError: boom\\n")
with open("{notes}", "a") as f:
    f.write("{name} resume=" + os.environ.get("FASTATTN_TEST_RESUME", "-") + "\\n")
if "{hang}" == "yes":
    time.sleep(60)
sys.exit(1)
"""


def _stages(notes, slow_s):
    def fake(name, hang):
        return one([PY, "-c", FAKE_TESTS.format(name=name, hang=hang, notes=notes)])

    def mark(name, extra=""):
        return one([PY, "-c", f"open({str(notes)!r}, 'a').write('{name}\\n'); {extra}"])

    return [
        Stage("built", 10, mark("built"), "skipped: already done", already=lambda: True),
        Stage("quick", 10, mark("quick"), "passes"),
        Stage("fails", 10, fake("fails", "no"), "a test fails", tests=True),
        Stage("cut", 3, fake("cut", "yes"), "killed after one test", tests=True),
        Stage("slow", 5, mark("slow", f"import time; time.sleep({slow_s})"), "killed at its cap"),
        Stage("late", 100, mark("late"), "not reached before the deadline"),
    ]


def test_deadline_results_and_resume(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    monkeypatch.setattr(gpu_session, "STAGES", _stages(notes, 60))
    first, second = tmp_path / "first", tmp_path / "second"
    t = time.monotonic()
    # 15 s reserve + 33 s: after the 3 s and 5 s stages under 30 s are left, so "late" is not started
    assert gpu_session.main(["--out", str(first), "--deadline", "48"]) == 1
    assert time.monotonic() - t < 20  # the hung stages were killed at their caps
    assert sorted(p.name for p in first.iterdir()) == ["session.tar.gz", "state.json", "summary.md"]
    state = json.loads((first / "state.json").read_text())
    assert {k: v["outcome"] for k, v in state["stages"].items()} == {
        "built": "skipped", "quick": "passed", "fails": "failed", "cut": "timed out", "slow": "timed out",
        "late": "not reached"}
    summary = (first / "summary.md").read_text()
    assert "| fails | failed |" in summary and "| 1 / 1 / 0 |" in summary
    assert "fails: tests/x.py::fails_b: AssertionError: boom" in summary
    assert "killed at its time limit" in summary  # the end of a cut stage's log
    with tarfile.open(first / "session.tar.gz") as tar:
        assert {"quick.log", "fails.tests.log", "cut.tests.log", "slow.log"} <= set(tar.getnames())
    assert notes.read_text().splitlines() == ["quick", "fails resume=-", "cut resume=-", "slow"]

    # The second call runs only what the first did not finish; the cut test stage resumes from its test log.
    notes.write_text("")
    monkeypatch.setattr(gpu_session, "STAGES", _stages(notes, 0))
    assert gpu_session.main(["--out", str(second), "--resume", str(first), "--deadline", "120"]) == 1
    ran = notes.read_text().splitlines()
    assert ran[0].startswith("cut resume=") and ran[0].endswith("cut.tests.log") and ran[1:] == ["slow", "late"]
    state = json.loads((second / "state.json").read_text())
    assert state["calls"] == 2 and state["stages"]["slow"]["outcome"] == "passed"
    assert state["stages"]["late"]["outcome"] == "passed" and state["stages"]["fails"]["calls"] == 1
    with tarfile.open(second / "session.tar.gz") as tar:
        log = tar.extractfile("cut.tests.log").read().decode()
    assert log.count("passed tests/x.py::cut_a") == 2  # both calls' lines kept


def test_dry_run_and_bad_arguments(tmp_path, capsys):
    assert gpu_session.main(["--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for s in gpu_session.STAGES:
        assert f"{s.name} (at most" in out
    assert "FASTATTN_CUDA_ARCHS=90" in out and "compute-sanitizer --tool racecheck" in out
    assert "bench_attention.py" in out and "summary.py" in out
    assert not list(tmp_path.iterdir())  # nothing run, nothing written
    with pytest.raises(SystemExit):
        gpu_session.main(["--out", str(tmp_path), "--only", "build,nope"])
    assert "--only: unknown stage(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_session.main(["--out", str(tmp_path), "--resume", str(tmp_path)])
    assert "holds no state.json" in capsys.readouterr().err


def test_bench_budgets_fit_the_time_given():
    cmds = gpu_session.bench_cmds(400, Path("w"))
    budgets = [float(c[c.index("--budget") + 1]) for c, _ in cmds if "--budget" in c]
    assert len(budgets) == len(gpu_session.BENCH_SHARES) and sum(budgets) <= 400
    assert cmds[-1][0][-3:] == ["benchmarks/summary.py", "--out", str(Path("w") / "bench")]
    assert os.path.basename(cmds[0][0][3]) == "bench_attention.py"


def test_sanitize_script_runs_on_the_emulator():
    """tests/gpu_sanitize.py (what the memcheck and racecheck stages run) launches every CUDA kernel; on the CPU
    emulator it must run through, or the two stages would spend the GPU's minutes on a broken script."""
    from fastattn import cuda
    why = cuda.why_unavailable("cpu")
    if why is not None:
        pytest.skip(f"the CUDA emulator is not available: {why}")
    r = subprocess.run([PY, "tests/gpu_sanitize.py", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every CUDA kernel ran (cpu)" in r.stdout
