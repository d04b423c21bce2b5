"""`make test` says which tests it skipped and why (a machine without Chromium skips the browser test)."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_options_of_make_test() -> list[str]:
    """The options `make test` passes to pytest, read from the Makefile itself (dry run: nothing is installed)."""
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in dry.splitlines() if " -m pytest" in line]
    return shlex.split(line.split(" -m pytest", 1)[1])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_prints_the_reason_of_every_skip(tmp_path):
    (tmp_path / "test_needs_chromium.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skipif(True, reason='Chromium not installed (apt-get install -y chromium)')\n"
        "def test_page():\n    pass\n"
    )
    options = pytest_options_of_make_test()
    proc = subprocess.run([sys.executable, "-m", "pytest", *options], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIPPED [1] test_needs_chromium.py:3: Chromium not installed (apt-get install -y chromium)" in proc.stdout


def test_readme_says_what_the_skippable_tests_need():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### What the tests need") :]
    assert "tests/test_browser.py" in section and "apt-get install -y chromium" in section and "CUDA" in section
