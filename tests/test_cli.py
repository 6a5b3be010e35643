"""The real CLI: a multirun of tiny jobs into a fresh sqlite store, the report over it, bad input."""
from __future__ import annotations

import csv
import hashlib
import subprocess
import sys

import pytest

from cifar_ablation.report import main as report_main
from cifar_ablation.tracking import JOB, REPORT, ROLE, SWEEP

from .conftest import TINY, run_cli, runs_in

METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second"}


def assert_tiny_job_run(client, r, parent) -> None:
    """A job run of the sweep below: FINISHED under its sweep, its tags, params, metrics per epoch, config."""
    assert r.info.status == "FINISHED"
    assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id == r.data.tags["sweep_id"]
    assert r.data.tags["rung"] == str(len(r.data.tags["tricks"].split(",")) if r.data.tags["tricks"] != "baseline" else 0)
    assert r.data.tags["data_checksum"] and r.data.tags["git_commit"] and r.data.tags["config_hash"]
    assert r.data.tags["device"] == "cpu" and r.data.tags["precision"] == "float32" and "gpu" not in r.data.tags
    assert r.data.params["train.epochs"] == "2" and r.data.params["model.widths"] == "[8, 16]"
    assert METRICS <= set(r.data.metrics)
    history = client.get_metric_history(r.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2]  # one value per epoch, step = epoch
    assert "config.yaml" in [a.path for a in client.list_artifacts(r.info.run_id)]


def test_sweep_then_report(tmp_path, imagefolder, capsys):
    data = imagefolder("tar.gz", per_class=80)
    db = tmp_path / "store" / "m.db"  # its folder does not exist yet
    common = [*TINY, "data=imagefolder", f"data.path={data}", f"data.cache_dir={tmp_path}/cache",
              f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=cli"]
    sweep = ["-m", "trick=[],[noise],[noise,batchnorm]", "seed=0,1"]
    res = run_cli([*sweep, *common], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for k in range(1, 7):  # the launcher's progress: one line per job, with an ETA while jobs are left
        (line,) = [ln for ln in out.splitlines() if f": job {k} of 6 done (FINISHED {k})" in ln]
        assert ("; ETA " in line) == (k < 6), line

    client, runs = runs_in(db, "cli")
    assert client.get_experiment_by_name("cli").tags["mlflow.experimentKind"] == "custom_model_development"
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    parents = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert len(jobs) == 6 and len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["tricks"] for r in jobs} == {"baseline", "noise", "noise,batchnorm"}
    for r in jobs:
        assert_tiny_job_run(client, r, parent)
    # the sweep's run holds its report: the table as its description, the files as artifacts
    assert parent.data.tags["mlflow.note.content"].startswith("## ladder — sweep ")
    assert "| 2 | batchnorm | 2 |" in parent.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/ladder.md", "report/ladder.csv", "report/ladder_accuracy.png"}
    assert sorted(r.info.run_name for r in jobs)[:3] == ["baseline seed=0", "baseline seed=1", "noise seed=0"]  # readable run names

    assert report_main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "cli", "--out", str(tmp_path / "rep")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines[1:]]
    assert lines[0].startswith("| rung | trick added | n | val acc")
    sha = hashlib.sha256(data.read_bytes()).hexdigest()[:12]  # what the runs trained on, by path and content:
    assert f"Data: {data.resolve()} (sha256 {sha})." in (tmp_path / "rep" / "ladder.md").read_text()
    assert "\nTrained on: cpu, float32.\n" in (tmp_path / "rep" / "ladder.md").read_text()
    assert [c[:3] for c in cells] == [["0", "baseline", "2"], ["1", "noise", "2"], ["2", "batchnorm", "2"]]
    rows = list(csv.DictReader(open(tmp_path / "rep" / "ladder.csv")))
    assert [r["tricks"] for r in rows] == ["", "noise", "noise,batchnorm"]
    assert (tmp_path / "rep" / "ladder.md").read_text().count("| 2 | batchnorm | 2 |") == 1
    assert (tmp_path / "rep" / "ladder_accuracy.png").stat().st_size > 1000
    _, runs = runs_in(db, "cli")
    reports = [r for r in runs if r.data.tags[ROLE] == REPORT]
    assert len(reports) == 1 and reports[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")} >= {
        "report/ladder.md", "report/ladder.csv", "report/ladder_accuracy.png"}

    # the same sweep again: every job already has a FINISHED run, so nothing trains
    again = run_cli([*sweep, *common], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipping") == 6
    assert ": job 6 of 6 done (skipped 6)" in again.stdout + again.stderr
    _, runs = runs_in(db, "cli")
    assert len([r for r in runs if r.data.tags[ROLE] == JOB]) == 6


def test_bad_input_fails_before_training_and_leaves_no_run(tmp_path, tracking_db):
    db = tracking_db
    res = run_cli(["trick=[bogus]", f"mlflow.tracking_uri=sqlite:///{db}"], tmp_path)
    assert res.returncode != 0
    assert "bogus" in res.stderr and "l1l2, noise" in res.stderr and "instancenorm, " in res.stderr
    res = run_cli(["trick=[dropout]", "trick.dropout.p=1.5", "data=imagefolder", f"data.path={tmp_path}",
                   f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=bad"], tmp_path)
    assert res.returncode != 0
    assert "trick.dropout.p=1.5" in res.stderr and "< 1" in res.stderr
    _, runs = runs_in(db, "bad")
    assert runs == []  # no run at all, so none RUNNING


@pytest.mark.slow
def test_four_designs_in_three_orders_in_one_experiment_train_each_configuration_once(tmp_path, imagefolder, capsys,
                                                                                        tracking_db):
    """A ladder, then a leave-one-out and a one-at-a-time over the other order, then the ladder over that order, in
    one experiment, as a user adds designs: each launches its 6 jobs with no -m (3 trick sets x 2 seeds, counted
    from the design's sweep params), trains only the configurations no earlier sweep finished, whatever order
    trained them (6, then 2, then none, then none), and its report holds every row of its design in its own
    order, the reused runs too."""
    common = [*TINY, "seed=0,1", "data=imagefolder", f"data.path={imagefolder('tar', per_class=80)}",
              f"data.cache_dir={tmp_path}/cache", f"mlflow.tracking_uri=sqlite:///{tracking_db}",
              "mlflow.experiment=designs"]
    for design, order, trained, rows in (
            ("ladder", "[noise,flip]", 6, ["0 | baseline", "1 | noise", "2 | flip"]),    # [] [noise] [noise,flip]
            ("leave_one_out", "[flip,noise]", 2, ["all tricks", "without flip", "without noise"]),  # + [flip]
            ("one_at_a_time", "[flip,noise]", 0, ["baseline", "+ flip", "+ noise"]),   # all three reused
            ("ladder", "[flip,noise]", 0, ["0 | baseline", "1 | flip", "2 | noise"])):
        res = run_cli([f"experiment={design}", f"ablation.order={order}", *common], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        log = res.stdout + res.stderr
        assert "Launching 6 jobs" in log and log.count("skipping ") == 6 - trained, log[-3000:]
        (last,) = [ln.split(": job 6 of 6 done (")[1] for ln in log.splitlines() if ": job 6 of 6 done (" in ln]
        assert sorted(last.rstrip(")").split(", ")) == [s for s in (f"FINISHED {trained}", f"skipped {6 - trained}")
                                                       if not s.endswith(" 0")], last
        client, runs = runs_in(tracking_db, "designs")
        latest = max((r for r in runs if r.data.tags[ROLE] == SWEEP), key=lambda r: r.info.start_time)
        assert latest.info.status == "FINISHED" and latest.data.tags["job_states"] == "FINISHED: 6"
        assert report_main(["--tracking-uri", f"sqlite:///{tracking_db}", "--experiment", "designs",
                            "--out", str(tmp_path / design)]) == 0
        out = capsys.readouterr().out
        for text in (out, latest.data.tags["mlflow.note.content"]):  # the report, and the sweep's own on its run
            table = [ln for ln in text.splitlines() if ln.startswith("| ")][1:]
            assert [ln[2:].split(" | 2 | ")[0] for ln in table] == rows and "Missing" not in text, text  # n = 2
        assert (tmp_path / design / f"{design}.md").exists() and (tmp_path / design / f"{design}_accuracy.png").exists()
    assert len([r for r in runs if r.data.tags[ROLE] == JOB]) == 8  # [], [noise], [noise,flip], [flip] x 2 seeds


@pytest.mark.slow
def test_factorial_sweep_reports_effects_and_shapley_values(tmp_path, imagefolder, capsys, tracking_db):
    db = tracking_db
    res = run_cli(["experiment=factorial", "ablation.order=[batchnorm,flip,noise]", "seed=0,1", *TINY,
                   "data=imagefolder", f"data.path={imagefolder('tar', per_class=80)}", f"data.cache_dir={tmp_path}/c",
                   f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=fact"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Launching 16 jobs" in res.stdout + res.stderr      # 2**3 subsets x 2 seeds
    assert report_main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "fact", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| + batchnorm + flip + noise | 2 |" in out and "Missing" not in out
    assert "### Effects" in out and "| batchnorm × flip |" in out and "residual df 9" in out
    assert "### Shapley values" in out and "| noise |" in out and "MISMATCH" not in out
    assert (tmp_path / "r" / "factorial.md").read_text().count("### ") == 3  # design, effects, Shapley
    for fig in ("effects", "interactions", "shapley"):
        assert (tmp_path / "r" / f"factorial_{fig}.png").stat().st_size > 5000, fig


def test_a_full_factorial_of_more_than_six_tricks_is_refused(tmp_path, tracking_db):
    res = run_cli(["experiment=factorial", "mlflow.tracking_uri=sqlite:///" + str(tracking_db)], tmp_path)
    assert res.returncode != 0 and "ablation.order" in res.stderr and "at most 6 tricks" in res.stderr


@pytest.mark.slow
def test_a_resolution_iv_fraction_of_all_eight_tricks_launches_and_names_its_aliases(tmp_path, imagefolder, capsys, tracking_db):
    db = tracking_db
    res = run_cli(["experiment=factorial", "ablation.fraction=4", *TINY, "train.epochs=1", "data=imagefolder",
                   f"data.path={imagefolder('tar', per_class=80)}", f"data.cache_dir={tmp_path}/c",
                   f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=frac"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "Launching 16 jobs" in log and "regular fraction 2^(8-4) of resolution IV" in log  # said at launch
    client, runs = runs_in(db, "frac")
    (parent,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert "resolution IV" in parent.data.tags["factorial_design"]
    assert "factorial_design.txt" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert report_main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "frac", "--out", str(tmp_path / "r"),
                        "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "Missing" not in out and "generator: flip = noise × batchnorm × dropout" in out
    assert "| noise × batchnorm = dropout × flip = l1l2 × crop = instancenorm × capacity (aliased: their sum) |" in out
    assert "### Shapley values (from the fitted model" in out


def test_two_configurations_of_one_trick_set_are_two_rows_not_two_seeds(tmp_path, imagefolder, capsys, tracking_db):
    """The user's flow: a sweep, then the same trick set with other settings, then `report --sweep all`."""
    db = tracking_db
    common = [*TINY, "data=imagefolder", f"data.path={imagefolder('tar', per_class=80)}", f"data.cache_dir={tmp_path}/c",
              f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=two"]
    assert run_cli(["-m", "trick=[],[noise]", *common], tmp_path).returncode == 0
    assert run_cli(["-m", "trick=[noise]", "trick.noise.std=0.5", "optim.lr=0.01", *common], tmp_path).returncode == 0
    assert report_main(["--tracking-uri", f"sqlite:///{db}", "--experiment", "two", "--sweep", "all",
                        "--out", str(tmp_path / "r"), "--no-figures"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "noise" in ln]
    assert [r.split(" | ")[:3] for r in rows] == [["| 1", "noise (lr=0.001, std=0.01)", "1"],
                                                  ["| 1", "noise (lr=0.01, std=0.5)", "1"]], rows


def test_more_seeds_of_two_rungs_later_pool_with_the_ladder(tmp_path, imagefolder, capsys, tracking_db):
    """The report's planning line answered: a ladder of 2 seeds, then 2 more seeds of its two top rungs only (the
    design's trick sets given on the command line). That sweep's own report, on its parent run, says where the
    other seeds are; `report --sweep all` pools them: 4 seeds of rungs 1-2, 2 of the baseline."""
    common = [*TINY, "data=imagefolder", f"data.path={imagefolder('tar', per_class=40)}", f"data.cache_dir={tmp_path}/c",
              f"mlflow.tracking_uri=sqlite:///{tracking_db}", "mlflow.experiment=more", "experiment=ladder",
              "ablation.order=[flip,batchnorm]"]
    assert run_cli([*common, "seed=0,1"], tmp_path).returncode == 0
    res = run_cli([*common, "seed=2,3", "trick=[flip],[flip,batchnorm]"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client, runs = runs_in(tracking_db, "more")
    later, first = client.search_runs([runs[0].info.experiment_id], f"tags.`{ROLE}` = '{SWEEP}'",
                                      order_by=["attributes.start_time DESC"])
    assert "more seeds" not in first.data.tags["mlflow.note.content"]
    note = later.data.tags["mlflow.note.content"]
    assert "(4 runs)" in note and "more seeds of 2 of these 2 configurations (up to 4 in all)" in note
    assert report_main(["--tracking-uri", f"sqlite:///{tracking_db}", "--experiment", "more", "--sweep", "all",
                        "--out", str(tmp_path / "r"), "--no-figures"]) == 0
    rows = {ln.split(" | ")[1]: ln.split(" | ")[2] for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| ") and ln[2].isdigit()}
    assert rows == {"baseline": "2", "flip": "4", "batchnorm": "4"}


def test_errors_are_one_line_without_hydras_banner(tmp_path):
    res = run_cli(["train.epochs=0", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"], tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: invalid config: train.epochs=0 is not allowed; train.epochs must be an integer >= 1"]
    res = run_cli(["data=imagefolder", f"data.path={tmp_path}/none.tar"], tmp_path)   # data: the same
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: invalid config: data.path")
    assert "HYDRA_FULL_ERROR" not in res.stderr and "Traceback" not in res.stderr
    assert "Traceback" in run_cli(["train.epochs=0"], tmp_path, env={"CIFAR_ABLATION_TRACEBACK": "1"}).stderr
    res = run_cli(["-m", "seed=0,1", "train.epochz=3"], tmp_path)  # a misspelled key: before Hydra starts
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        "error: invalid config: train.epochz is not a key of the config; did you mean train.epochs? (train's keys:")
    assert "HYDRA_FULL_ERROR" not in res.stderr and not (tmp_path / "multirun").exists()
    res = run_cli(["+optim.lrr=0.01", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"], tmp_path)  # Hydra's advice
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        "error: invalid config: optim.lrr is not a key of the config; did you mean optim.lr?")


def test_hydras_job_chdir_is_refused_as_it_would_move_jobs_away_from_their_paths(tmp_path):
    for mode in ([], ["-m"]):
        res = run_cli([*mode, "hydra.job.chdir=true", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"], tmp_path)
        assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
            "error: invalid config: hydra.job.chdir=True is not allowed; hydra.job.chdir must be false: the config's "
            "relative paths (data.path"), res.stderr[-2000:]
        assert not (tmp_path / "m.db").exists() and not (tmp_path / "outputs").exists()


def test_a_bad_value_stops_the_command_before_mlflow_is_imported(tmp_path):
    """A value's error comes from the checks, before MLflow (a second of imports) is loaded: in a single run and in a
    sweep, where Hydra makes the sweep's callback (sweep.py) before any job."""
    probe = ("import sys\nfrom cifar_ablation.__main__ import cli\nsys.argv = ['cifar_ablation', *sys.argv[1:]]\n"
             "try:\n    cli()\nexcept SystemExit as e:\n    print(e, '|', 'mlflow' in sys.modules)\n")
    for args in (["train.epochs=0"], ["-m", "seed=0,1", "optim.lr=-1"]):
        res = subprocess.run([sys.executable, "-c", probe, *args, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        want = ("train.epochs must be an integer >= 1" if len(args) == 1
                else "optim.lr must be a number > 0 (job 1 of 2: seed=0; no job was started)")
        assert res.stdout.strip().endswith(f"is not allowed; {want} | False"), res.stdout + res.stderr[-2000:]
        assert not (tmp_path / "m.db").exists()


def test_a_bad_value_in_a_sweeps_later_job_stops_the_sweep_before_any_job_starts(tmp_path, imagefolder, tracking_db):
    """Each job's config is composed and checked as the sweep starts: a bad value reached only by a later job (a
    swept value, a trick's parameter set where the trick is chosen, a group option no file has) stops the sweep
    before its first job trains, naming the job, in one line; nothing is written to the store."""
    data = [*TINY, "data=imagefolder", f"data.path={imagefolder('tar')}", f"mlflow.tracking_uri=sqlite:///{tracking_db}"]
    for args, want in ((["-m", "optim.lr=0.01,-1", "seed=0,1"], "invalid config: optim.lr=-1 is not allowed; "
                        "optim.lr must be a number > 0 (job 3 of 4: optim.lr=-1 seed=0; no job was started)"),
                       (["experiment=ladder", "ablation.order=[flip,dropout]", "+ablation.params.dropout.p=1.5"],
                        "invalid config: trick.dropout.p=1.5 is not allowed; trick.dropout.p must be a number >= 0 "
                        "and < 1 (job 3 of 3: trick=[flip,dropout]; no job was started)"),
                       (["-m", "model=vgg,wide"], "In 'config': Could not find 'model/wide'; Available options in "
                        "'model': vgg (job 2 of 2: model=wide; no job was started)")):
        res = run_cli([*args, *data], tmp_path)
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [f"error: {want}"], res.stderr[-3000:]
        assert "Traceback" not in res.stderr and "epoch 1/" not in res.stdout + res.stderr
    assert runs_in(tracking_db, "cifar-ablation")[1] == []


def test_a_sweep_over_a_key_whose_default_is_unset_nests_under_its_sweep_run(tmp_path, imagefolder, tracking_db):
    """`data=imagefolder` with data.path swept: the sweep's own config holds data.path's default (none), which
    alone does not pass the checks; every job does, so the sweep has its parent run, progress and report."""
    paths = f"data.path={imagefolder('tar')},{imagefolder('dir')}"
    res = run_cli(["-m", "data=imagefolder", paths, *TINY, f"mlflow.tracking_uri=sqlite:///{tracking_db}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client, runs = runs_in(tracking_db, "cifar-ablation")
    (parent,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert len(jobs) == 2 and {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "2"
