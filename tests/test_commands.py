"""The commands users start from: --help, the make targets, an installed wheel, MLflow's own variables."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_ablation.report import main as report_main
from cifar_ablation.tracking import JOB, ROLE

from .conftest import TINY, run_cli, runs_in


def test_help_introduces_the_tool(tmp_path):
    res = run_cli(["--help"], tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("cifar-ablation: ablation studies of CNN")
    assert "powered by Hydra" not in res.stdout
    assert "trick: batchnorm, capacity, crop, dropout, flip, instancenorm, l1l2, noise" in res.stdout
    assert 'Tab completion of keys and tricks (Hydra\'s): eval "$(cifar-ablation -sc install=bash)".' in res.stdout


@pytest.mark.parametrize("mirror", [True, False])
def test_make_targets_train_on_the_mirror_where_present_else_the_original_cifar10(tmp_path, mirror):
    """make demo / ladder / bench, as `make -n` spells them out: the offline JPEG mirror where the file is (our
    machines), else CIFAR-10 through torchvision's download (a user's machine), each saying which."""

    path = tmp_path / "cifar10-jpeg.tar.gz"
    if mirror:
        path.write_bytes(b"")
    res = subprocess.run(["make", "-n", "demo", "ladder", "bench", f"MIRROR={path}"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    data, hydra = (str(path), f"data=imagefolder data.path={path}") if mirror else ("cifar10", "data=cifar10")
    assert f'echo "demo data: {hydra}"' in res.stdout and f'echo "ladder data: {hydra}"' in res.stdout
    assert f"experiment=slide_ladder {hydra} " in res.stdout
    assert f'echo "bench data: {data}"' in res.stdout and f"cifar_ablation.bench --data {data}\n" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine `make ladder` would train the whole ladder")
def test_make_ladder_without_cuda_stops_saying_so_before_anything_trains():

    res = subprocess.run(["make", "ladder"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "make ladder: torch sees no CUDA device here" in out, out[-2000:]
    assert "LADDER_DEVICE=cpu make" in out and "cifar_ablation experiment=slide_ladder" not in out


def test_a_wheel_install_runs_from_any_folder(tmp_path, imagefolder, tracking_db):
    """`pip install .` (not editable), then the CLI from a folder of the user's with no checkout on the path: the
    config tree comes inside the package, and Hydra finds the streams launcher the wheel installs."""
    import shutil

    dist, site, work, src = (tmp_path / d for d in ("dist", "site", "work", "src"))
    root = Path(__file__).resolve().parents[1]
    src.mkdir()  # the wheel built from a copy: setuptools writes build/ where it builds
    for f in ("pyproject.toml", "README.md"):
        shutil.copyfile(root / f, src / f)
    for d in ("cifar_ablation", "conf", "hydra_plugins"):
        shutil.copytree(root / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    # without isolation: the build backend is this environment's (the dev extra's setuptools>=68)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(dist), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("cifar_ablation-*.whl")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    (site / "sitecustomize.py").write_text(  # the editable install's path entry (the checkout) taken away
        f"import sys\nsys.path[:] = [p for p in sys.path if p.rstrip('/') != {str(root)!r}]\n")
    work.mkdir()
    env = {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import cifar_ablation.checks as c; print(c.__file__, c.CONF_DIR)"],
                           cwd=work, env={**os.environ, **env}, capture_output=True, text=True)
    assert where.stdout.split() == [str(site / "cifar_ablation" / "checks.py"), str(site / "cifar_ablation" / "conf")]
    res = run_cli(["-m", "trick=[],[flip]", "seed=0", "hydra/launcher=streams", "jobs_per_device=2", *TINY,
                   "data=imagefolder", f"data.path={imagefolder('tar')}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"mlflow.tracking_uri=sqlite:///{tracking_db}", "mlflow.experiment=wheel"], work, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "in this process, 2 at a time on their own streams" in res.stdout + res.stderr
    _, runs = runs_in(tracking_db, "wheel")
    assert sorted(r.data.tags["tricks"] for r in runs if r.data.tags[ROLE] == JOB) == ["baseline", "flip"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_mlflows_own_variables_choose_the_store_and_experiment(tmp_path, imagefolder, tracking_db, monkeypatch):
    """MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME, as every MLflow tool reads them, are the defaults of the
    jobs and of the report; the command line still wins; a password in the variable is refused before anything
    starts (it would be logged as a param), masked in the error."""
    other = tmp_path / "other.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tracking_db}", "MLFLOW_EXPERIMENT_NAME": "from-env"}
    data = [*TINY, "data=imagefolder", f"data.path={imagefolder('tar')}", f"data.cache_dir={tmp_path / 'cache'}"]
    res = run_cli(["trick=[flip]", *data], tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    _, runs = runs_in(tracking_db, "from-env")
    assert [r.data.tags["tricks"] for r in runs if r.data.tags[ROLE] == JOB] == ["flip"]
    assert runs[0].data.params["mlflow.tracking_uri"] == f"sqlite:///{tracking_db}"
    res = run_cli(["trick=[flip]", *data, f"mlflow.tracking_uri=sqlite:///{other}"], tmp_path, env=env)
    assert res.returncode == 0 and runs_in(other, "from-env")[1], res.stderr[-3000:]  # the command line wins
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert report_main(["--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    (table,) = (tmp_path / "rep").glob("*.md")
    assert "experiment from-env" in table.read_text()

    secret = {"MLFLOW_TRACKING_URI": "http://alice:hunter2@trackhost:5000"}
    res = run_cli(["trick=[flip]", *data], tmp_path / "rep", env=secret)
    assert res.returncode == 1 and "hunter2" not in res.stdout + res.stderr
    assert "error: invalid config: MLFLOW_TRACKING_URI='http://alice:***@trackhost:5000'" in res.stderr, res.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in res.stderr and not (tmp_path / "rep" / "multirun").exists()


def test_hydras_tab_completion_installs_and_completes_keys_and_tricks(tmp_path):
    """`cifar-ablation -sc install=bash` (Hydra's shell completion) prints its bash function, and the completion it
    queries lists keys and tricks: the command line's own checks let Hydra's flags and their arguments through."""
    exe = str(Path(sys.executable).parent / "cifar-ablation")
    install = subprocess.run([exe, "--shell-completion", "install=bash"], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0 and "complete -o nospace -o default -F hydra_bash_completion cifar-ablation" in \
        install.stdout, install.stderr[-2000:]
    for line, want in (("train.ep", "train.epochs="), ("trick=", "trick=instancenorm")):
        query = subprocess.run([exe, "-sc", "query=bash"], capture_output=True, text=True, cwd=tmp_path,
                               env={**os.environ, "COMP_LINE": f"cifar-ablation {line}"})
        assert query.returncode == 0 and want in query.stdout.split(), query.stdout + query.stderr[-2000:]


def test_the_ui_on_a_port_another_program_holds_says_so_instead_of_pointing_at_it(tmp_path, tracking_db, capsys):
    """`make ui` with another MLflow UI on its port: `mlflow ui` failed there and exited 0, after printing addresses
    that led to the other program's runs. Now one line, exit 2, before any address."""
    import socket

    from cifar_ablation.ui import main as ui_main

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert ui_main(["--tracking-uri", f"sqlite:///{tracking_db}", "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"error: port {port} on 127.0.0.1 is taken (")
    assert out.err.rstrip().endswith("choose another, --port N (make ui PORT=N)")


def test_ui_pictures_of_an_experiment_without_a_sweep_or_of_none_say_so(tmp_path, tracking_db, capsys):
    """`python -m cifar_ablation.ui --screenshots DIR` pictures the experiment's latest sweep: where there is none
    (a single run only), or no such experiment, one line, exit 2 (a LookupError's traceback before)."""
    from mlflow.tracking import MlflowClient

    from cifar_ablation.ui import main as ui_main

    uri = f"sqlite:///{tracking_db}"
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("single"), tags={ROLE: JOB})
    shots = ["--tracking-uri", uri, "--port", "0", "--screenshots", str(tmp_path / "shots")]
    assert ui_main([*shots, "--experiment", "single"]) == 2
    assert capsys.readouterr().err == f"error: no sweep in experiment 'single' of {uri} to picture: run one first\n"
    assert ui_main([*shots, "--experiment", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no experiment 'nope' in this store; it has: ")
    assert not (tmp_path / "shots").exists()
