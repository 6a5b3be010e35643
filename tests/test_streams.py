"""hydra/launcher=streams: a sweep's runs trained side by side in one process (on CPU: interleaved step by step,
the same code that puts each on its own CUDA stream). Each run must give exactly what it gives alone, fail alone,
and be interrupted and resumed like any other run. Real CLI, real signals, real sqlite store."""
from __future__ import annotations

import os
import re
import shutil
import signal

import pytest
from mlflow.entities import LoggedModelStatus

from cifar_ablation.tracking import JOB, ROLE, SWEEP

from .conftest import make_imagefolder, run_cli, runs_in
from .test_faults import SLOW, slow_data, start, wait_for  # noqa: F401  (slow_data: a fixture)

# Every source of randomness a run has: dropout and noise (the global generator, shared by the process: each
# member keeps its own state), flip and crop (the run's own generator), batchnorm statistics.
TRICKS = "trick=[noise,dropout],[batchnorm,dropout,flip,crop]"
KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")
SHARES = ["hydra/launcher=streams", "jobs_per_device=4", "hydra.launcher.processes=2"]  # 2 gangs of 2


def curves(client, run) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in KEYS}


def jobs_by(runs, key: str) -> dict[str, object]:
    return {r.data.tags[key]: r for r in runs if r.data.tags[ROLE] == JOB}


@pytest.fixture(scope="module")
def alone(tmp_path_factory, _empty_store) -> dict[str, dict]:
    """The curves each of TRICKS' runs gives alone (Hydra's basic launcher, one run after the other): what every
    test here compares its runs side by side with. Once per module: the same images every time."""
    tmp = tmp_path_factory.mktemp("alone")
    db = tmp / "m.db"
    shutil.copyfile(_empty_store, db)
    data = [f"data.path={make_imagefolder(tmp, 'tar', per_class=300)}", f"data.cache_dir={tmp}/cache"]
    res = run_cli(["-m", TRICKS, *SLOW, *data, f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=alone"],
                  tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    client, runs = runs_in(db, "alone")
    return {tricks: curves(client, r) for tricks, r in jobs_by(runs, "tricks").items()}


def test_runs_side_by_side_give_what_they_give_alone_and_fail_alone(tmp_path, slow_data, tracking_db, alone):
    """Four jobs as two gangs of two, in two processes (hydra.launcher.processes=2): side by side in a process
    and across processes alike, each run gives exactly what it gives alone; a diverging one fails alone."""
    db = tracking_db
    common = [*SLOW, *slow_data, f"mlflow.tracking_uri=sqlite:///{db}"]
    res = run_cli(["-m", TRICKS, "optim.lr=0.001,1e30", *SHARES, *common, "mlflow.experiment=together",
                   "hydra.sweep.dir=together"], tmp_path)
    assert res.returncode != 0, res.stderr[-3000:]  # two jobs diverge: the sweep says so, after every job ran
    out = res.stdout + res.stderr  # two gangs of two (jobs 0-1, 2-3: one diverging in each), two processes
    assert "Launching 4 jobs in 2 processes, 2 at a time in each" in out
    assert out.count("Launching 2 jobs in this process, 2 at a time") == 2
    client, runs = runs_in(db, "together")
    states = {(r.data.tags["tricks"], r.data.params["optim.lr"]): r.info.status
              for r in runs if r.data.tags[ROLE] == JOB}
    assert states == {("noise,dropout", "0.001"): "FINISHED", ("batchnorm,dropout,flip,crop", "0.001"): "FINISHED",
                      ("noise,dropout", "1e+30"): "FAILED", ("batchnorm,dropout,flip,crop", "1e+30"): "FAILED"}
    failed = [r for r in runs if r.info.status == "FAILED" and r.data.tags[ROLE] == JOB]
    assert all(r.data.tags["failure_reason"].startswith("NonFiniteLoss") for r in failed)
    (sweep,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert sweep.info.status == "FAILED" and "FINISHED: 2" in sweep.data.tags["job_states"], res.stderr[-5000:]

    together = {r.data.tags["tricks"]: r for r in runs
                if r.data.tags[ROLE] == JOB and r.data.params["optim.lr"] == "0.001"}
    assert {tricks: curves(client, r) for tricks, r in together.items()} == alone  # exact, every epoch
    models = client.search_logged_models([sweep.info.experiment_id])  # each finished run's own trained net
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in together.values())
    assert all(m.status == LoggedModelStatus.READY for m in models)

    for num in range(4):  # each job's own log file holds its own lines, tagged with its number
        epochs = [line for line in (tmp_path / "together" / str(num) / "__main__.log").read_text().splitlines()
                  if "] - #" in line and " epoch " in line]
        assert all(f"] - #{num} epoch " in line for line in epochs), epochs
        assert len(epochs) == (4 if num in (0, 2) else 0), epochs  # jobs 1 and 3: lr 1e30, NaN in epoch 1


def test_ctrl_c_kills_every_run_of_the_gang_and_the_relaunch_resumes_them_exactly(tmp_path, slow_data, tracking_db,
                                                                                    alone):
    db = tracking_db
    args = ["-m", TRICKS, "hydra/launcher=streams", "jobs_per_device=2", *SLOW, *slow_data,
            f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=gang"]
    proc = start(args, tmp_path)
    wait_for(proc, "epoch 2/4")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    client, runs = runs_in(db, "gang")
    jobs = jobs_by(runs, "tricks")
    assert {t: r.info.status for t, r in jobs.items()} == {"noise,dropout": "KILLED",
                                                           "batchnorm,dropout,flip,crop": "KILLED"}
    assert all("KeyboardInterrupt" in r.data.tags["failure_reason"] for r in jobs.values())
    assert not [r for r in runs if r.info.status == "RUNNING"]

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for r in jobs.values():
        assert f"resuming interrupted run {r.info.run_id}" in again.stdout + again.stderr
    client, runs = runs_in(db, "gang")
    resumed = jobs_by(runs, "tricks")
    assert {t: (r.info.run_id, r.info.status) for t, r in resumed.items()} == \
        {t: (r.info.run_id, "FINISHED") for t, r in jobs.items()}

    assert {tricks: curves(client, r) for tricks, r in resumed.items()} == alone  # exact, every epoch

    # a wider sweep later: the two finished configs are skipped (their runs join it), one new one trains
    wider = run_cli([*args[:1], TRICKS + ",[flip]", *args[2:]], tmp_path)
    assert wider.returncode == 0, wider.stderr[-3000:]
    assert (wider.stdout + wider.stderr).count("skipping ") == 2
    client, runs = runs_in(db, "gang")
    assert sorted(r.data.tags["tricks"] for r in runs if r.data.tags[ROLE] == JOB) == \
        ["batchnorm,dropout,flip,crop", "flip", "noise,dropout"]
    newest = max((r for r in runs if r.data.tags[ROLE] == SWEEP), key=lambda r: r.info.start_time)
    assert newest.info.status == "FINISHED" and newest.data.tags["job_states"] == "FINISHED: 3"


def test_sigterm_to_a_streams_sweep_leaves_every_run_killed_and_the_sweep_failed(tmp_path, slow_data, tracking_db):
    """kill (or SLURM's scancel) while several runs share the process: each run, and the sweep, says so."""
    db = tracking_db
    proc = start(["-m", TRICKS, "hydra/launcher=streams", "jobs_per_device=2", *SLOW, *slow_data, "train.epochs=50",
                  f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=term"], tmp_path)
    wait_for(proc, "epoch 1/50")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    _, runs = runs_in(db, "term")
    assert sorted(r.info.status for r in runs if r.data.tags[ROLE] == JOB) == ["KILLED", "KILLED"]
    assert all("Terminated" in r.data.tags["failure_reason"] for r in runs if r.data.tags[ROLE] == JOB)
    (sweep,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert sweep.info.status == "FAILED"


def test_a_bad_archive_in_one_job_stops_the_sweep_with_one_error_and_the_runs_training_resume_later(
        tmp_path, slow_data, tracking_db):
    """A job's user error found as it joins (its archive unreadable: the sweep's start checks values, not the
    data's bytes), while the first job trains: the sweep stops with the one `error:` line; the first run ends
    KILLED, saying why, and resumes on relaunch."""
    db, bad = tracking_db, tmp_path / "corrupt.tar"
    bad.write_bytes(b"not an archive" * 100)
    good = slow_data[0].partition("=")[2]
    common = [*SLOW, slow_data[1], f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=bad", "train.epochs=2"]
    res = run_cli(["-m", "hydra/launcher=streams", "jobs_per_device=2", *common, f"data.path={good},{bad}"], tmp_path)
    assert res.returncode != 0
    assert f"error: cannot read {bad}" in res.stderr, res.stderr[-3000:]
    client, runs = runs_in(db, "bad")
    first, second = sorted((r for r in runs if r.data.tags[ROLE] == JOB), key=lambda r: r.info.start_time)
    assert first.info.status == "KILLED" and second.info.status == "FAILED"
    assert f"another job's SystemExit (error: cannot read {bad}" in first.data.tags["failure_reason"]
    again = run_cli([*common, f"data.path={good}"], tmp_path)
    assert again.returncode == 0 and f"resuming interrupted run {first.info.run_id}" in again.stdout + again.stderr


# --- hydra.launcher.processes: the jobs split into shares, each share a gang in a process of its own ----------


@pytest.mark.slow  # in make test-slow: CI runs the two suites side by side, and this one ended 1.5 min sooner
def test_a_bad_archive_in_one_share_stops_every_process_with_one_error(tmp_path, slow_data, tracking_db):
    bad = tmp_path / "corrupt.tar"
    bad.write_bytes(b"not an archive" * 100)
    paths = f"data.path={slow_data[0].partition('=')[2]},{bad}"
    res = run_cli(["-m", *SHARES, *SLOW, slow_data[1], "train.epochs=30", paths, "seed=0,1",
                   f"mlflow.tracking_uri=sqlite:///{tracking_db}", "mlflow.experiment=bad"], tmp_path)
    assert res.returncode != 0
    assert f"error: cannot read {bad}" in res.stderr, res.stderr[-3000:]
    _, runs = runs_in(tracking_db, "bad")
    assert not [r for r in runs if r.info.status == "RUNNING"], (
        [(r.info.status, r.data.tags) for r in runs], res.stdout[-6000:] + res.stderr[-6000:])
    (sweep,) = [r for r in runs if r.data.tags[ROLE] == SWEEP]
    assert sweep.info.status == "FAILED"


def test_sigterm_then_ctrl_c_to_gangs_in_processes_leave_every_run_killed_and_relaunches_resume_them(
        tmp_path, slow_data, tracking_db):
    """The launcher alone gets SIGTERM (`kill PID`), then, relaunched, a terminal's Ctrl-C (SIGINT to its
    process group): each time every run of both processes ends KILLED with the signal's reason and the sweep
    FAILED; the third launch resumes the same four runs and finishes them, every epoch logged once."""
    db = tracking_db
    args = ["-m", TRICKS, *SHARES, *SLOW, *slow_data, "train.epochs=6", "seed=0,1",
            f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=stop"]

    def stopped(send, reason: str) -> set[str]:
        proc = start(args, tmp_path, own_group=True)
        seen = wait_for(proc, "#0 epoch ")  # job 0 trains in the first process, job 2 in the second
        seen += "" if "#2 epoch " in seen else wait_for(proc, "#2 epoch ")
        send(proc)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, seen + out
        _, runs = runs_in(db, "stop")
        jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
        assert len(jobs) == 4 and all(r.info.status == "KILLED" for r in jobs), seen + out
        assert all(reason in r.data.tags["failure_reason"] for r in jobs), [r.data.tags for r in jobs]
        newest = max((r for r in runs if r.data.tags[ROLE] == SWEEP), key=lambda r: r.info.start_time)
        assert newest.info.status == "FAILED"
        return {r.info.run_id for r in jobs}

    first = stopped(lambda p: p.send_signal(signal.SIGTERM), "Terminated")
    assert stopped(lambda p: os.killpg(p.pid, signal.SIGINT), "KeyboardInterrupt") == first  # resumed, stopped
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    client, runs = runs_in(db, "stop")
    jobs = [r for r in runs if r.data.tags[ROLE] == JOB]
    assert {r.info.run_id for r in jobs} == first and all(r.info.status == "FINISHED" for r in jobs)
    for r in jobs:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(1, 7))


def test_the_pace_line_gives_the_share_of_the_wall_inside_graph_launches_where_there_were_any():
    from cifar_ablation.steps import Launches
    from cifar_ablation.streams import Gang

    g = Gang()
    assert "inside CUDA graph launches" not in g.pace()  # none on a CPU: the line stays as it was
    Launches.seconds += 3600.0  # as if an hour of launches had been timed since the gang began
    try:
        assert re.search(r"CPU \d+ % of one core, \d+ % of the wall inside CUDA graph launches$", g.pace())
    finally:
        Launches.seconds -= 3600.0


def test_the_launcher_refuses_a_count_below_one_naming_its_key():
    from hydra_plugins.cifar_ablation_launcher.streams_launcher import StreamsLauncher

    for kwargs, key in (({"runs": 0}, "hydra.launcher.runs=0"), ({"processes": 0}, "hydra.launcher.processes=0")):
        with pytest.raises(SystemExit, match=rf"^error: invalid config: {re.escape(key)} is not allowed\b.* must be "
                                             "an integer >= 1"):
            StreamsLauncher(**kwargs)


def test_a_run_waiting_for_the_gpu_at_an_epochs_end_holds_neither_the_gang_nor_its_pace(make_cfg, monkeypatch):
    """On CUDA a run's epoch end yields while the GPU finishes its queued work (train.settled): here the GPU is
    made to take three looks each time. The gang goes on with the other run meanwhile, counts only training steps
    in its pace, and each run gives exactly what it gives alone; evaluation yields between its batches too."""
    import torch

    from cifar_ablation import train as train_mod
    from cifar_ablation.streams import Gang, Member

    from .test_steps import SMALL, random_images

    looks = []

    def settled(p):
        for _ in range(3):
            looks.append(p.cfg.seed)
            yield None

    cfgs, images = [make_cfg(*SMALL, f"seed={s}") for s in (0, 1)], random_images()
    alone = [train_mod.train(c, images, device=torch.device("cpu")) for c in cfgs]
    monkeypatch.setattr(train_mod, "settled", settled)
    ends, g = {}, Gang()
    for k, c in enumerate(cfgs):
        g.add(Member.prime(k, train_mod.training(c, images, device=torch.device("cpu")),
                           lambda value, error, k=k: ends.setdefault(k, (value, error)))[0])
    while g.members:
        g.round()
    assert [ends[k][1] for k in (0, 1)] == [None, None]
    assert [{key: ends[k][0][key] for key in KEYS} for k in (0, 1)] == [{key: m[key] for key in KEYS} for m in alone]
    steps_per_epoch = len(images.train_y) // cfgs[0].train.batch_size
    assert g.steps == 2 * cfgs[0].train.epochs * steps_per_epoch  # 2 runs; the looks and eval batches not counted
    assert looks.count(0) == looks.count(1) == 2 * 3 * cfgs[0].train.epochs  # training's end and evaluation's
