"""The test suite's own console output: slow tests are named."""

import re
import shutil
import subprocess
import sys
from pathlib import Path


def test_slow_tests_are_named_when_they_finish_and_when_they_start_again(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_pair.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(0.5)\n\ndef test_quick():\n    pass\n"
    )
    env = {"LONGSWAP_SLOW_TEST_SECONDS": "0.3", "PATH": "/usr/bin:/bin"}

    def run():
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "test_pair.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    first = run()
    assert re.search(r"^test_pair.py::test_slow: \d+ s$", first, re.MULTILINE)
    assert "test_quick:" not in first and "last time" not in first
    second = run()
    assert "test_pair.py::test_slow: running (took" in second
    assert "test_quick:" not in second
