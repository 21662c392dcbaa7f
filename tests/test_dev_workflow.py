"""`make test-fast` (unit tests only) beside `make test` (everything): the target exists, selects by
the registered `slow` marker, is documented, and leaves out the tests that train or load real models."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_make_test_fast_runs_the_unit_tests_only():
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert target, "Makefile has no test-fast target"
    assert '-m "not slow"' in target.group(1) and "pytest" in target.group(1)
    assert "make test-fast" in (ROOT / "README.md").read_text()
    assert re.search(r'"slow:', (ROOT / "pyproject.toml").read_text())  # registered, so a typo is caught


@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_fast_selection_leaves_out_training_and_real_models():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) > 100  # the unit tests are there
    for heavy in ("test_training_cpu.py::test_full_finetune_on_cpu", "test_e2e.py::", "test_argilla_browser.py::",
                  "test_training_losses.py::"):
        assert not [i for i in ids if heavy in i], heavy
