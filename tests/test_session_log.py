"""FASTATTN_TEST_LOG / FASTATTN_TEST_RESUME (tests/conftest.py): a run cut off by a GPU session's time limit leaves
a line per finished test, and the next run skips what that file records."""
import os
import subprocess
import sys
from pathlib import Path

SAMPLE = '''
import pytest

@pytest.mark.parametrize("x", [1, 2, 3])
def test_x(x):
    assert x != 2, "two\\nis refused"

def test_skipped():
    pytest.skip("no reason")
'''


def _pytest(tmp_path, **env):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_sample.py")], env=env, capture_output=True, text=True, cwd=tmp_path)


def test_log_then_resume(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    log = tmp_path / "first.log"
    _pytest(tmp_path, FASTATTN_TEST_LOG=str(log))
    lines = log.read_text().splitlines()
    outcomes = {line.split()[1].split("::")[1]: line.split()[0] for line in lines if not line.startswith(" ")}
    assert outcomes == {"test_x[1]": "passed", "test_x[2]": "failed", "test_x[3]": "passed",
                        "test_skipped": "skipped"}
    failure = lines.index(next(line for line in lines if line.startswith("failed")))
    assert "two" in lines[failure + 1] and "is refused" in lines[failure + 2]  # the message, indented

    # The resumed run deselects everything the log records except what it does not: here, test_x[3].
    log.write_text("\n".join(line for line in lines if "test_x[3]" not in line) + "\n")
    second = tmp_path / "second.log"
    r = _pytest(tmp_path, FASTATTN_TEST_LOG=str(second), FASTATTN_TEST_RESUME=str(log))
    assert "1 passed, 3 deselected" in r.stdout, r.stdout + r.stderr
    assert [line.split()[:2] for line in second.read_text().splitlines()] == [
        ["passed", "test_sample.py::test_x[3]"]]
