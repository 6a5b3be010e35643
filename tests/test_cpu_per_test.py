"""tests/cpu_per_test.py, the opt-in plugin that says where CI's CPU goes: a child's CPU counts to its test."""
from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT


def test_a_tests_child_processes_count_to_it_and_the_costliest_comes_first(tmp_path):
    (tmp_path / "test_two.py").write_text(
        "import subprocess, sys\n"
        "def test_idle():\n    pass\n"
        "def test_child_burns():\n"
        "    subprocess.run([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
        "while time.process_time() - t < 0.5: pass'], check=True)\n")
    out = tmp_path / "cpu.txt"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.cpu_per_test", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_two.py")], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},  # CI's --basetemp
                              "CPU_PER_TEST": str(out), "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    head, first, second = out.read_text().splitlines()
    assert head.endswith("s of wall") and float(head.split()[0]) >= 0.5
    total, own, kids, wall, nodeid = first.split()
    assert nodeid.endswith("test_child_burns") and float(kids) >= 0.5 and float(total) >= float(kids)
    assert second.split()[-1].endswith("test_idle")
