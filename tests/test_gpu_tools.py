"""The prepared GPU run's helpers, on the CPU: MLflow's wheel slimmed for the trip (experiments/slim_wheel.py), and
py-spy's stacks of a process summed up (experiments/speed/spy_table.py), from real recordings of real processes."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from .conftest import load_script

slim_wheel = load_script("experiments/slim_wheel.py")
spy_table = load_script("experiments/speed/spy_table.py")


def test_a_slimmed_wheel_installs_without_the_folder_it_left_out(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": "X = 1\n", "demo/server/js/app.js": "x" * 5000, "demo/server/api.py": "Y = 2\n",
             "demo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "demo-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in {**files, "demo-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)

    assert slim_wheel.slim(wheel, ("demo/server/js/",)) == 1
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        kept_record = z.read("demo-1.0.dist-info/RECORD").decode()
    assert "demo/server/js/app.js" not in names and "demo/server/api.py" in names
    assert "server/js" not in kept_record and "demo/server/api.py,," in kept_record
    assert slim_wheel.slim(wheel, ("demo/server/js/",)) == 0  # again: nothing more to drop

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(wheel)], check=True)
    assert (site / "demo" / "server" / "api.py").exists() and not (site / "demo" / "server" / "js").exists()
    with pytest.raises(SystemExit, match="no such wheel"):
        slim_wheel.main([str(tmp_path / "absent-1.0-py3-none-any.whl"), "demo/server/js/"])


def test_stacks_are_sorted_into_launches_cuda_calls_waits_and_cpu_work(tmp_path):
    """The categories, on stacks as py-spy writes them for a gang's thread on CUDA (no CUDA here to record): a wait
    is found below the innermost Python frame also where the leaf is an address py-spy could not name."""
    graphs = "CUDAGraph.replay (/opt/torch/lib/python3.12/site-packages/torch/cuda/graphs.py:691)"
    step = "GraphStep.__call__ (/repo/cifar_ablation/steps.py:127)"
    raw = tmp_path / "spy-4242.txt"
    raw.write_text(textwrap.dedent(f"""\
        thread (4242): MainThread;<module> (/repo/x.py:1);{step};{graphs};cudaGraphLaunch (libcudart.so.13) 60
        thread (4242): MainThread;<module> (/repo/x.py:1);{step};0x7f00 (libcuda.so.580.159.04) 10
        thread (4242): MainThread;<module> (/repo/x.py:1);GraphStep.schedule (/repo/cifar_ablation/steps.py:160);0x7f01 (libcuda.so.1) 5
        thread (4242): MainThread;<module> (/repo/x.py:1);Gang.round (/repo/cifar_ablation/streams.py:150);take_gil (libpython3.12.so) 10
        thread (4242): MainThread;<module> (/repo/x.py:1);Gang.round (/repo/cifar_ablation/streams.py:150) 15
        thread (4243): Thread-1 (writer);run (/usr/lib/threading.py:1);save (/repo/jobrun.py:5) 30
        thread (4243): Thread-1 (writer);run (/usr/lib/threading.py:1);PyThread_acquire_lock_timed (libpython3.12.so);0x7f02 (libc.so.6) 70
        """))
    table = spy_table.tables([raw], 10, "test")
    row = next(line for line in table.splitlines() if line.startswith("| 4242 |"))
    assert row == "| 4242 | 100 | 60 % | 15 % | 10 % | 15 % | 0.30 |", table
    assert "| CUDAGraph.replay cuda/graphs.py:691 ← cudaGraphLaunch (libcudart.so.13) | 60.0 % |" in table
    assert "| Gang.round cifar_ablation/streams.py:150 | 15.0 % |" in table


def test_a_missing_recording_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        spy_table.main([str(tmp_path / "spy-1.txt")])
    assert "no such py-spy raw file: " in capsys.readouterr().err


def record(tmp_path: Path, name: str, body: str) -> str:
    """py-spy's table of a real Python process running `body` in its main thread while a second thread sleeps."""
    script = tmp_path / f"{name}.py"
    script.write_text("import sys, threading, time\n"
                      "threading.Thread(target=time.sleep, args=(30,), daemon=True, name='sleeper').start()\n"
                      "sys.stdout.write('ready\\n'); sys.stdout.flush()\n" + textwrap.dedent(body))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        raw = tmp_path / f"spy-{proc.pid}.txt"
        res = subprocess.run([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                              "--pid", str(proc.pid), "--duration", "2", "--rate", "50", "--native", "--idle",
                              "--threads", "--format", "raw", "--output", str(raw)],
                             capture_output=True, text=True, timeout=60)
        assert raw.exists(), res.stdout + res.stderr
    finally:
        proc.kill()
        proc.wait()
    return spy_table.tables([raw], 2, name)


GRAPH = """\
import os, tempfile
d = tempfile.mkdtemp()
os.makedirs(d + "/cuda")
open(d + "/cuda/__init__.py", "w").close()
with open(d + "/cuda/graphs.py", "w") as f:  # a stand-in with torch's names: torch/cuda/graphs.py, CUDAGraph.replay
    f.write("class CUDAGraph:\\n    def replay(self):\\n        return sum(i * i for i in range(10_000))\\n")
sys.path.insert(0, d)
from cuda.graphs import CUDAGraph
g = CUDAGraph()
while True:
    g.replay()
"""


@pytest.mark.parametrize("body, main, share", [
    ("while True:\n    sum(i * i for i in range(10_000))\n", "CPU work", 80),
    ("while True:\n    time.sleep(0.5)\n", "waiting", 80),
    (GRAPH, "graph launch", 80),  # the frame as py-spy names it, found by its name and file
])
def test_a_real_recording_says_where_the_main_thread_was(tmp_path, body, main, share):
    table = record(tmp_path, main.split()[0], body)
    header, _, row = table.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert int(cells["samples"]) >= 50, table  # 2 s at 50 Hz, give or take
    assert int(cells[f"main thread: {main}"].rstrip(" %")) >= share, table
    assert float(cells["other threads busy (cores)"]) < 0.2, table  # the sleeping thread waits
