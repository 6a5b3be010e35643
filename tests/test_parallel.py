"""Many jobs at once: Hydra's joblib and submitit launchers, and a real MLflow tracking server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from cifar_ablation.lineage import fluent_store
from cifar_ablation.report import main as report_main
from cifar_ablation.tracking import JOB, REPORT, ROLE, SWEEP

from .conftest import TINY, run_cli, runs_in
from .services import stack

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_args(tmp_path: Path, data: Path, uri: str, experiment: str) -> list[str]:
    return [*TINY, "data=imagefolder", f"data.path={data}", f"data.cache_dir={tmp_path}/cache",
            f"mlflow.tracking_uri={uri}", f"mlflow.experiment={experiment}"]


@pytest.mark.slow
def test_eight_concurrent_jobs_on_a_new_machine_into_a_brand_new_sqlite_store(tmp_path, cifar10_site):
    """A user online with no store and no data yet: a parallel sweep's 8 job processes start at once. The store
    is made once; CIFAR-10 is downloaded once (over HTTP from a local stand-in for its site, answering after
    1.5 s) and decoded once, the other processes waiting on its lock and reading what the first made."""
    site = cifar10_site(per_batch=40, delay=1.5)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # every process of the sweep, loky's workers too: the local site
        "import os\nfrom torchvision.datasets import CIFAR10\n"
        "CIFAR10.url, CIFAR10.tgz_md5 = os.environ['CIFAR10_SITE'], os.environ['CIFAR10_MD5']\n")
    env = {**ONE_THREAD, "CIFAR10_SITE": site.url, "CIFAR10_MD5": site.md5,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    db = tmp_path / "fresh" / "m.db"
    assert not db.exists()
    res = run_cli(["-m", "seed=0,1,2,3,4,5,6,7", "hydra/launcher=parallel", "jobs_per_device=8", *TINY,
                   "data=cifar10", f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=par"], tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    client, runs = runs_in(db, "par")
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert sorted(r.data.tags["seed"] for r in jobs) == [str(i) for i in range(8)]
    assert len({r.data.tags["pid"] for r in jobs}) > 1  # really in several processes
    (parent,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    for r in jobs:
        assert r.info.status == "FINISHED" and r.data.tags["sweep_id"] == parent.info.run_id
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == [1, 2], key
    assert parent.info.status == "FINISHED"
    assert "job 8 of 8 done (FINISHED 8)" in res.stdout + res.stderr  # progress from the launching process
    # the data: one download, one decode, the same in every run, nothing half-made left
    assert site.gets == 1
    assert {r.data.tags["data_source"] for r in jobs} == {f"cifar10:{tmp_path / 'data'}"}
    assert len({r.data.tags["data_checksum"] for r in jobs}) == 1
    logs = "".join(f.read_text() for f in tmp_path.glob("multirun/*/*/*/*.log"))
    assert logs.count("downloading CIFAR-10 into") == 1 and logs.count("decoding images once into") == 1, logs
    assert sorted(f.suffix for f in (tmp_path / "cache").iterdir()) == [".lock", ".pt"]  # no .tmp left


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path, imagefolder, tracking_db):
    db = tracking_db
    res = run_cli(["-m", "seed=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                   *tiny_args(tmp_path, imagefolder("tar", per_class=80), f"sqlite:///{db}", "submitit")],
                  tmp_path, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    _, runs = runs_in(db, "submitit")
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert sorted((r.data.tags["seed"], r.info.status) for r in jobs) == [("0", "FINISHED"), ("1", "FINISHED")]


@pytest.fixture
def mlflow_server(tmp_path):
    """An open `mlflow server` over sqlite on loopback (the authenticated PostgreSQL one: test_cluster.py)."""
    with stack.mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}", auth=False, host="127.0.0.1") as s:
        yield s["uri"]


def api(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def test_jobs_and_report_through_a_real_tracking_server(tmp_path, imagefolder, mlflow_server):
    url = mlflow_server
    res = run_cli(["-m", "trick=[],[noise]", *tiny_args(tmp_path, imagefolder("tar", per_class=80), url, "served"),
                   "mlflow.log_model=true"], tmp_path, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert report_main(["--tracking-uri", url, "--experiment", "served", "--out", str(tmp_path / "rep")]) == 0

    exp_id = api(url, "experiments/get-by-name?experiment_name=served")["experiment"]["experiment_id"]
    runs = api(url, "runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    by_role: dict[str, list] = {}
    for r, t in zip(runs, tags):
        by_role.setdefault(t[ROLE], []).append((r, t))
    (parent, _), = by_role[SWEEP]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    assert len(by_role[JOB]) == 2
    for r, t in by_role[JOB] + by_role[REPORT]:
        assert t["mlflow.parentRunId"] == parent_id  # nested under the sweep in the UI
    (report, _), = by_role[REPORT]
    listed = api(url, f"artifacts/list?run_id={report['info']['run_id']}&path=report")["files"]
    assert {"report/ladder.md", "report/ladder_accuracy.png", "report/ladder_val_curves.png"} <= {f["path"] for f in listed}
    # the artifacts really went through the server's proxy into its destination folder
    assert list((tmp_path / "artifacts").rglob("ladder_accuracy.png"))
    # so did each run's trained model, which loads back through the server
    assert len(list((tmp_path / "artifacts").rglob("model.pt2"))) == 2
    with fluent_store(url):
        net = mlflow.pytorch.load_model(f"runs:/{by_role[JOB][0][0]['info']['run_id']}/model")
    assert net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)  # model.num_classes


@pytest.mark.slow
def test_four_launchers_started_at_once_on_a_brand_new_sqlite_store(tmp_path, imagefolder):
    """Two terminals (here four) launching sweeps together into a store that does not exist yet: MLflow's own
    schema creation races ('duplicate column name: step', 'table logged_models already exists') unless
    store creation is serialized (tracking.client_for's file lock)."""
    db = tmp_path / "new" / "m.db"
    args = tiny_args(tmp_path, imagefolder("tar", per_class=40), f"sqlite:///{db}", "race")
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cifar_ablation", "-m", f"trick=[{t}]", "seed=0,1",
                               "train.epochs=1", *args], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for t in ("noise", "flip", "dropout", "batchnorm")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in out, out[-3000:]
    _, runs = runs_in(db, "race")
    sweeps = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert [r.info.status for r in sweeps] == ["FINISHED"] * 4
    assert sorted(r.data.tags["tricks"] + r.data.tags["seed"] for r in jobs) == \
        [f"{t}{s}" for t in ("batchnorm", "dropout", "flip", "noise") for s in "01"]
    assert all(r.info.status == "FINISHED" for r in jobs)
