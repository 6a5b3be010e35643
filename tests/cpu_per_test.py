"""An opt-in pytest plugin: the CPU time of each test (setup, call and teardown), this process's and that of its
children once they are waited for (CLI and job processes, services a fixture stops), the most first. CI is bound
by its two cores (README, "The test suite"): this says where they go.

    .venv/bin/python -m pytest -p tests.cpu_per_test -m slow ...      (CPU_PER_TEST=FILE, default cpu_per_test.txt)

Columns: CPU s in all, this process's, its children's; wall s; the test. A module-scoped fixture's processes
count where they end (the module's last test), and a process a test leaves running, nowhere.
"""
from __future__ import annotations

import os
import resource
import time

import pytest

ROWS: list[tuple[float, float, float, float, str]] = []


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (own, kids), wall = _cpu(), time.monotonic()
    yield
    own2, kids2 = _cpu()
    ROWS.append((own2 - own + kids2 - kids, own2 - own, kids2 - kids, time.monotonic() - wall, item.nodeid))


def pytest_sessionfinish(session):
    path = os.environ.get("CPU_PER_TEST", "cpu_per_test.txt")
    with open(path, "w") as f:
        f.write(f"{sum(r[0] for r in ROWS):8.1f} CPU s in all, {sum(r[3] for r in ROWS):.1f} s of wall\n")
        for total, own, kids, wall, nodeid in sorted(ROWS, reverse=True):
            f.write(f"{total:8.1f} {own:7.1f} {kids:7.1f} {wall:7.1f} {nodeid}\n")
