"""The MLflow UI in a real browser: `mlflow ui` on 127.0.0.1 over a store holding a small finished sweep, opened
in headless Chromium (Debian's package, driven by Playwright) the way a user first opens it."""
from __future__ import annotations

from pathlib import Path

import pytest

from cifar_ablation.tracking import reader
from cifar_ablation.ui import BROWSER, latest_sweep, runs_url, screenshots, serve

from .conftest import TINY, free_port, run_cli

pytestmark = pytest.mark.skipif(
    not Path(BROWSER).exists(), reason=f"no browser at {BROWSER}: `make services` installs Debian's chromium "
    "(as root, with apt-get); elsewhere this test cannot run")


def test_the_ui_opens_on_the_sweep_its_jobs_and_its_report(tmp_path, imagefolder, tracking_db):
    db = tracking_db
    uri = f"sqlite:///{db}"
    res = run_cli(["-m", "trick=[],[flip]", "seed=0", *TINY, "train.epochs=1", "data=imagefolder",
                   f"data.path={imagefolder('tar', per_class=40)}", f"mlflow.tracking_uri={uri}",
                   "mlflow.experiment=ui", "mlflow.log_model=true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    exp_id, sweep = latest_sweep(reader(uri), "ui")

    with serve(uri, free_port(), tmp_path / "ui.log") as base:
        seen = screenshots(runs_url(base, exp_id), sweep, "tricks", tmp_path / "shots")

    # the model-training view (not the GenAI one), the sweep expanded over its two job runs
    assert "Model training" in seen["sweep"] and "Evaluation runs" not in seen["sweep"]
    assert sweep in seen["sweep"] and "baseline seed=0" in seen["sweep"] and "flip seed=0" in seen["sweep"]
    # the sweep's own run shows the sweep's table as its description
    assert "Δ vs previous rung" in seen["report"] and "n=1: no verdict" in seen["report"]
    # the chart view, runs grouped by trick set
    assert "Group by: tricks" in seen["charts"] and "Group: flip" in seen["charts"] and "Group: baseline" in seen["charts"]
    # the experiment's Models tab: each job's trained net, ready, by the run that logged it
    assert seen["models"].count("Ready") == 2 and "baseline seed=0" in seen["models"] and "flip seed=0" in seen["models"]
    for name in ("1-sweep.png", "2-report.png", "3-charts.png", "4-models.png"):
        assert (tmp_path / "shots" / name).stat().st_size > 20_000, name
