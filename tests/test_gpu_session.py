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
        Stage("built", 10, mark("built"), "skipped: already done", already=lambda session: True),
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


def test_bench_budgets_fit_the_time_given(tmp_path):
    def budgets(cmds):
        return {os.path.basename(c[0][3]): float(c[0][c[0].index("--budget") + 1]) for c in cmds if "--budget" in c[0]}
    cmds = gpu_session.bench_cmds(400, tmp_path)
    b = budgets(cmds)
    assert len(b) == len(gpu_session.BENCH_SHARES) and sum(b.values()) + gpu_session.STARTUP_S * len(b) <= 400
    assert cmds[-1][0][-3:] == ["benchmarks/summary.py", "--out", str(tmp_path / "bench")]
    assert cmds[-1][2:] == ("always",)  # the summary is written even when the scripts used up the stage
    assert list(b)[0] == "bench_attention.py"
    # a resumed stage runs only the scripts whose JSON is missing or partial, with the time they would have had
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "attention.json").write_text(json.dumps({"partial": False}))
    (tmp_path / "bench" / "softmax.json").write_text(json.dumps({"partial": True}))
    again = budgets(gpu_session.bench_cmds(400, tmp_path))
    assert "bench_attention.py" not in again and "bench_softmax.py" in again
    assert again["bench_softmax.py"] > b["bench_softmax.py"]


def test_always_commands_and_stops(tmp_path, monkeypatch):
    """A stage's "always" command (summary.py) runs after the others used up its time; a resumed pytest stage
    with nothing left to run (pytest's exit 5) passes; SIGTERM (the command's own limit) kills the stage in flight
    and still writes the three files; the build is redone when csrc/ changed since it was made."""
    notes = tmp_path / "notes.txt"
    mark = f"open({str(notes)!r}, 'a').write('{{}}\\n')"
    hang = [PY, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(gpu_session, "STAGES", [
        Stage("spent", 2, lambda sec, work: [(hang, 60), ([PY, "-c", mark.format("after")], 5),
                                             ([PY, "-c", mark.format("summary")], 5, "always")], "always runs"),
        Stage("resumed", 10, one([PY, "-c", "import sys; sys.exit(5)"]), "nothing left", tests=True)])
    out = tmp_path / "out"
    gpu_session.main(["--out", str(out), "--deadline", "60"])
    assert notes.read_text().splitlines() == ["summary"]
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["spent"]["outcome"] == "timed out" and state["resumed"]["outcome"] == "failed"  # no resume file
    (tmp_path / "resumed.tests.log").write_text("passed tests/x.py::a 0.1s\n")
    session = gpu_session.Session(tmp_path / "out2", 60, None)
    (session.work / "resumed.tests.log").write_text("passed tests/x.py::a 0.1s\n")
    session.stage(gpu_session.STAGES[1])
    assert session.state["stages"]["resumed"]["outcome"] == "passed"
    assert not gpu_session.extension_current(session)  # built by no call of this session
    session.state["built_from"] = "an older csrc/"
    assert not gpu_session.extension_current(session)

    driver = tmp_path / "driver.py"
    driver.write_text(f"""import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import gpu_session
gpu_session.STAGES = [gpu_session.Stage("hung", 100, gpu_session.one({hang!r}), "hangs")]
gpu_session.main(["--out", {str(tmp_path / "out3")!r}, "--deadline", "200"])
""")
    p = subprocess.Popen([PY, str(driver)], stdout=subprocess.PIPE, text=True)
    assert "hung" in p.stdout.readline()  # the stage started
    time.sleep(1)
    p.terminate()
    assert p.wait(timeout=30) == 128 + 15
    state = json.loads((tmp_path / "out3" / "state.json").read_text())["stages"]
    assert state["hung"]["outcome"] == "timed out" and "stopped" in state["hung"]["note"]


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
