"""The stores a reader (report, UI) and a job open: one that is not there, one a newer MLflow wrote."""
from __future__ import annotations

import sqlite3

from mlflow.tracking import MlflowClient

from cifar_ablation.report import main as report_main
from cifar_ablation.ui import main as ui_main

from .conftest import TINY, run_cli


def test_a_report_on_a_missing_store_says_so_and_creates_nothing(tmp_path, capsys):
    assert report_main(["--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not (tmp_path / "nope.db").exists()
    assert ui_main(["--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"]) == 2  # make ui: the same
    assert "no MLflow store at" in capsys.readouterr().err and not (tmp_path / "nope.db").exists()


def test_a_store_a_newer_mlflow_wrote_stops_readers_and_jobs_saying_so(tmp_path, tracking_db, capsys):
    """MLflow upgrades a store an older MLflow wrote as it opens it; one a newer MLflow wrote (its schema's
    revision unknown here, as the published stores' 3.17 schema is to MLflow 3.11) stops it with advice to run
    `mlflow db upgrade`, which cannot help. Every command says what can: a newer MLflow; the store is untouched."""
    known = revision(tracking_db)  # (MLflow is not asked first: it keeps a store open per URI in a process)
    set_revision(tracking_db, "ffffffffffff")  # a revision from the future
    before = tracking_db.read_bytes()
    said = "was written by a newer MLflow than this one"

    assert report_main(["--tracking-uri", f"sqlite:///{tracking_db}", "--experiment", "Default"]) == 2
    err = capsys.readouterr().err
    assert said in err and "(ffffffffffff)" in err and "pip install -U mlflow" in err and "Traceback" not in err
    assert ui_main(["--tracking-uri", f"sqlite:///{tracking_db}"]) == 2
    assert said in capsys.readouterr().err
    for sweep in ([], ["-m", "seed=0,1"]):  # a run, and a sweep (whose callback opens the store first)
        res = run_cli([*sweep, *TINY, f"mlflow.tracking_uri=sqlite:///{tracking_db}"], tmp_path)
        assert res.returncode == 1 and said in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and "UserWarning" not in res.stderr
    assert tracking_db.read_bytes() == before

    set_revision(tracking_db, known)  # the same store at the revision this MLflow wrote opens as before
    assert "Default" in [e.name for e in MlflowClient(f"sqlite:///{tracking_db}").search_experiments()]


def revision(db_file) -> str:
    with sqlite3.connect(db_file) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def set_revision(db_file, rev: str) -> None:
    with sqlite3.connect(db_file) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (rev,))


def test_mlflows_file_store_is_refused_up_front_unless_mlflow_is_told_to_allow_it(tmp_path, imagefolder, monkeypatch,
                                                                                  capsys):
    """MLflow refuses its file store (a folder, file:…) as each job opens it, unless MLFLOW_ALLOW_FILE_STORE is
    true: the command line, the sweep and the report refuse it first with one error line, and take it when allowed."""
    folder = tmp_path / "mlruns"
    for uri in (str(folder), f"file://{folder}"):
        res = run_cli(["-m", "seed=0,1", f"mlflow.tracking_uri={uri}"], tmp_path)
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [
            f"error: invalid config: mlflow.tracking_uri={uri!r} is not allowed; mlflow.tracking_uri must be a "
            "database or a server (sqlite:///mlflow.db, postgresql://…, http://…): MLflow keeps its file store (a "
            "folder such as ./mlruns) in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true; "
            "`mlflow migrate-filestore` moves one into a database"], res.stderr[-2000:]
        assert report_main(["--tracking-uri", uri]) == 2
        assert "--tracking-uri must be a database or a server" in capsys.readouterr().err
    assert not folder.exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in: then the store is MLflow's to open
    res = run_cli(["trick=[flip]", *TINY, "data=imagefolder", f"data.path={imagefolder('tar')}",
                   f"mlflow.tracking_uri=file://{folder}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = MlflowClient(f"file://{folder}").search_runs([e.experiment_id for e in MlflowClient(
        f"file://{folder}").search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["tricks"] == "flip"


def test_a_deleted_experiment_stops_runs_sweeps_and_the_report_saying_how_to_restore_it(tmp_path, tracking_db, capsys):
    """Deleted in the MLflow UI, an experiment keeps its name (until `mlflow gc`) and MLflow refuses runs in it:
    every job failed with MLflow's traceback. Now one line says so and how to restore it; nothing is written."""
    uri = f"sqlite:///{tracking_db}"
    client = MlflowClient(uri)
    exp = client.create_experiment("gone")
    client.delete_experiment(exp)
    for mode in ([], ["-m", "seed=0,1"]):
        res = run_cli([*mode, *TINY, f"mlflow.tracking_uri={uri}", "mlflow.experiment=gone"], tmp_path)
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [
            f"error: the experiment 'gone' (id {exp}) in {uri} was deleted (the MLflow UI's Delete, or `mlflow "
            f"experiments delete`): restore it with `mlflow experiments restore --experiment-id {exp}` "
            f"(MLFLOW_TRACKING_URI={uri}), or choose another mlflow.experiment"], res.stderr[-2000:]
    assert client.search_runs([exp], run_view_type=3) == []  # ViewType.ALL: no run, deleted or not
    assert report_main(["--tracking-uri", uri, "--experiment", "gone"]) == 2  # it said "no job runs" before
    assert "was deleted" in capsys.readouterr().err and client.search_runs([exp], run_view_type=3) == []
    from cifar_ablation.ui import main as ui_main  # its pictures of the experiment's latest sweep: the same line

    assert ui_main(["--tracking-uri", uri, "--experiment", "gone", "--port", "0", "--screenshots", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: the experiment 'gone' (id ")
