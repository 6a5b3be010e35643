"""claim_run: what a job does with its config's earlier runs, decided without processes or a store (and claim,
which finds them in one); and how a JobRun writes each epoch."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_ablation.identity import hashes
from cifar_ablation.jobrun import CREATE, REFUSE, RESUME, SKIP, JobRun, claim, claim_run
from cifar_ablation.tracking import JOB, ROLE

ME = {"host": "here", "pid": "100"}


def run(status: str, pid: str = "7", name: str = "") -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=name or f"{status}-{pid}"),
                           data=SimpleNamespace(tags={"host": "here", "pid": pid}))


def alive(r) -> bool:
    """In these tests, pids below 50 are dead processes."""
    return int(r.data.tags["pid"]) >= 50


@pytest.mark.parametrize("earlier,force,action,run_id", [
    ([], False, CREATE, None),
    ([run("FINISHED")], False, SKIP, "FINISHED-7"),
    ([run("FINISHED", name="new"), run("FINISHED", name="old")], False, SKIP, "new"),   # newest first
    ([run("FINISHED")], True, CREATE, None),                                           # force re-runs
    ([run("KILLED")], False, RESUME, "KILLED-7"),
    ([run("RUNNING", pid="7")], False, RESUME, "RUNNING-7"),                           # its process is gone
    ([run("RUNNING", pid="70")], False, REFUSE, "RUNNING-70"),                         # a live twin
    ([run("RUNNING", pid="70")], True, CREATE, None),                                  # force ignores it
    ([run("RUNNING", pid="100")], False, CREATE, None),                                # our own pid: no twin
    ([run("FAILED")], False, CREATE, None),                                            # a failure is not resumed
    ([run("KILLED", name="new"), run("RUNNING", pid="8", name="old")], False, RESUME, "new"),
    ([run("RUNNING", pid="70"), run("KILLED")], False, REFUSE, "RUNNING-70"),          # the twin may finish it
    ([run("KILLED"), run("FINISHED")], False, SKIP, "FINISHED-7"),                     # done is done
    ([run("FINISHED"), run("KILLED")], True, RESUME, "KILLED-7"),                      # force still resumes
])
def test_claim_run(earlier, force, action, run_id):
    c = claim_run(earlier, ME, force, alive)
    assert c.action == action
    assert (c.run.info.run_id if c.run is not None else None) == run_id


def test_claim_finds_a_configs_runs_in_any_trick_order_and_those_older_releases_tagged(make_cfg, tracking_db):
    """A run's identity leaves the trick order out, so a sweep in another order reuses it. A run an older release
    tagged (its hash held the order) is still found by the same config in that order, as it was then."""
    client = MlflowClient(f"sqlite:///{tracking_db}")
    exp = client.create_experiment("claims")

    def finished(config_hash: str) -> str:
        r = client.create_run(exp, tags={ROLE: JOB, "config_hash": config_hash})
        client.set_terminated(r.info.run_id, "FINISHED")
        return r.info.run_id

    def claimed(order: str):
        c = claim(make_cfg("trick=[noise,flip]", f"ablation.order={order}"), client, exp)
        return c.action, c.run and c.run.info.run_id

    new, old = hashes(make_cfg("trick=[noise,flip]", "ablation.order=[noise,flip]"))
    assert claimed("[noise,flip]") == (CREATE, None)
    older = finished(old)
    assert claimed("[noise,flip]") == (SKIP, older) and claimed("[flip,noise]") == (CREATE, None)
    newer = finished(new)
    assert claimed("[noise,flip]") == claimed("[flip,noise]") == claimed("[flip,dropout,noise]") == (SKIP, newer)


def test_an_epoch_is_written_in_the_background_from_a_copy_then_flushed(tmp_path, tracking_db):
    """end_epoch returns before its writes land and training may change its tensors at once: what lands is the
    state as it was at the end of the epoch, checkpoint and metrics both, by the time flush() returns."""
    client = MlflowClient(f"sqlite:///{tracking_db}")
    run_id = client.create_run(client.create_experiment("bg")).info.run_id
    jr = JobRun(client, run_id)
    weights = torch.zeros(1000)
    for epoch in (1, 2):
        jr.end_epoch(epoch, {"val_acc": epoch / 10}, lambda: {"epoch": epoch, "model": {"w": weights}})
        weights += 1  # the next epoch's training, while the writer thread writes
    jr.flush()
    assert JobRun(client, run_id).load_checkpoint()["model"]["w"].eq(1).all()  # epoch 2's copy: before the 2nd +1
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc")] == [(1, 0.1), (2, 0.2)]


def test_a_ctrl_c_while_the_writer_thread_starts_does_not_keep_the_process_alive():
    """Seen with a ThreadPoolExecutor as the writer: a Ctrl-C landing just after its worker started (right after
    "epoch 1" is logged) left the worker unknown to the executor's exit hook, and the process waited for it
    forever. The writer's thread is a daemon: the process exits."""
    code = ("import threading\n"
            "from cifar_ablation import jobrun\n"
            "start = threading.Thread.start\n"
            "def start_then_interrupt(self):\n"
            "    start(self)\n"
            "    raise KeyboardInterrupt\n"
            "threading.Thread.start = start_then_interrupt\n"
            "jobrun.WRITER.submit(print, 'written')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "KeyboardInterrupt" in res.stderr


def test_slurms_warning_signal_is_passed_on_to_submitits_handler_and_named_in_the_reason():
    """submitit's SIGUSR2 handler (it requeues the job, then exits the process) still runs while a run is open;
    the SystemExit it raises is an interruption, named as what followed SLURM's warning. Handlers put back after."""
    import os
    import signal

    from cifar_ablation.interrupts import Terminated, interruption, job_signals, raise_terminated

    calls = []

    def submitits(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)
    before = signal.signal(signal.SIGUSR2, submitits), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e, job_signals() as signals:
            assert signal.getsignal(signal.SIGTERM) is raise_terminated
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):  # the handler runs between bytecodes of this thread
                pass
        assert calls == [signal.SIGUSR2] and signals.seen == {"SIGUSR2"}
        assert interruption(e.value, signals.seen).startswith(
            "SystemExit: -1 after SIGUSR2, SLURM's warning of the job's time limit or of its preemption: submitit "
            "requeued the job")
        assert interruption(Terminated("interrupted by signal 15"), set()) == "Terminated: interrupted by signal 15"
        assert signal.getsignal(signal.SIGUSR2) is submitits and signal.getsignal(signal.SIGTERM) == before[1]
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        with job_signals():  # no handler of SIGUSR2's there (not under submitit): none is put in
            assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before[0] or signal.SIG_DFL)


def test_a_signal_while_the_run_closes_waits_until_it_has_closed():
    """The SIGTERM SLURM sends a job that submitit has just requeued (or a second Ctrl-C) comes while the run
    writes its reason and status: it is held until the run is closed, then sent on to the handler it would have met."""
    import os
    import signal

    from cifar_ablation.interrupts import job_signals

    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(("after", signum)))
    try:
        with job_signals() as signals:
            signals.hold()
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            got.append("closed")  # no Terminated raised while closing
        assert got == ["closed", ("after", signal.SIGTERM)]  # held, then sent on once
    finally:
        signal.signal(signal.SIGTERM, before)



@pytest.mark.parametrize("statement,stop,raised", [
    ("INSERT INTO runs", "SIGTERM", "Terminated"),          # as the run is created: before its try was entered
    ("INSERT INTO params", "SIGTERM", "Terminated"),        # inside the try, in its first writes
    ("INSERT INTO params", "SIGINT", "KeyboardInterrupt"),  # Ctrl-C alike
    ("INSERT INTO runs", "SIGUSR2", "SystemExit"),          # SLURM's warning, to submitit's handler (it exits)
])
def test_a_stop_that_lands_inside_a_store_write_closes_the_run_killed(make_cfg, tracking_db, statement, stop, raised):
    """A signal delivered while MLflow's sqlite store writes (after one of its INSERTs, before the COMMIT): raised
    there, the exception left SQLAlchemy's connection behind holding the database's write lock; the run's closing
    then waited 20 s per write and failed ('database is locked'), and the run stayed RUNNING (seen in CI: a share of
    hydra.launcher.processes=2 stopped as it opened its run). The store's calls hold signals until they return, and
    the run's opening until its try is entered: the stop comes between two calls, and the run closes KILLED."""
    import os
    import signal

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from cifar_ablation.identity import flat_params
    from cifar_ablation.jobrun import Claim, job_run
    from cifar_ablation.tracking import open_experiment

    cfg = make_cfg(f"mlflow.tracking_uri=sqlite:///{tracking_db}", "mlflow.experiment=stop")
    client, exp_id = open_experiment(cfg)
    sent = []

    def stop_mid_write(conn, cursor, sql, *args):
        if sql.startswith(statement) and not sent:
            sent.append(sql)
            os.kill(os.getpid(), getattr(signal, stop))  # its handler runs at the next bytecode: in SQLAlchemy

    def submitits(signum, frame):  # as submitit's SIGUSR2 handler ends: requeued, the process exits
        raise SystemExit(-1)

    event.listen(Engine, "after_cursor_execute", stop_mid_write)
    # a Ctrl-C even where the tests run with SIGINT ignored (a shell's background job)
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGUSR2, submitits)
    try:
        with pytest.raises(BaseException) as e, job_run(cfg, [], client, exp_id, Claim(CREATE)):
            pytest.fail("the run was opened and its params written: the stop should have come before this")
    finally:
        event.remove(Engine, "after_cursor_execute", stop_mid_write)
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGUSR2, before[1])
    assert sent and type(e.value).__name__ == raised
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"].startswith(raised), run.data.tags
    if stop == "SIGUSR2":
        assert "after SIGUSR2, SLURM's warning" in run.data.tags["failure_reason"]
    if "params" in statement:
        assert run.data.params.keys() == flat_params(cfg).keys()  # the call it came in went on to its end


def test_the_sigterm_slurm_sends_a_requeued_job_does_not_cut_submitits_handler_short():
    """submitit's SIGUSR2 handler requeues the job (scontrol requeue), and SLURM answers with a SIGTERM that can
    come before the handler's own exit (seen in test_cluster's requeue test: the run's reason said Terminated).
    Held while the handler runs: its exit is what stops the run, and the SIGTERM goes on, after the run closed, to
    the handler it would have met (submitit's, which logs it). A handler that returns lets the SIGTERM act."""
    import os
    import signal

    from cifar_ablation.interrupts import Terminated, job_signals

    got = []

    def submitits(signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's answer to the requeue
        for _ in range(1000):  # delivered here, between bytecodes, were it not held
            pass
        got.append("requeued")
        raise SystemExit(-1)
    before = (signal.signal(signal.SIGUSR2, submitits),
              signal.signal(signal.SIGTERM, lambda signum, frame: got.append(("after", signum))))
    try:
        with pytest.raises(SystemExit), job_signals():
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):
                pass
        assert got == ["requeued", ("after", signal.SIGTERM)]

        signal.signal(signal.SIGUSR2, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))  # no exit
        with pytest.raises(Terminated), job_signals():
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):
                pass
    finally:
        signal.signal(signal.SIGUSR2, before[0] or signal.SIG_DFL)
        signal.signal(signal.SIGTERM, before[1])


def test_a_ctrl_c_while_the_sweep_run_closes_waits_until_it_is_closed(tracking_db, monkeypatch):
    """A second Ctrl-C (or a SIGTERM) while the launcher closes the sweep's run (its jobs settled, its report made:
    seconds, with figures) waits until the run is closed, then stops the launcher: the sweep is never left RUNNING
    by it (a Ctrl-C acted on between the report and the closing did so)."""
    import os
    import signal

    from cifar_ablation import sweep
    from cifar_ablation.tracking import ROLE, SWEEP, client_for

    client = client_for(f"sqlite:///{tracking_db}")
    parent = client.create_run(client.create_experiment("close"), tags={ROLE: SWEEP}).info.run_id
    made = []

    def report_then_ctrl_c(client, parent, out, figures=True):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # delivered here, between bytecodes, were it not held
            pass
        made.append(figures)
    monkeypatch.setattr(sweep, "publish", report_then_ctrl_c)
    tracking = sweep.SweepTracking()
    tracking.client, tracking.parent = client, parent
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C even in a shell's background job
    try:
        with pytest.raises(KeyboardInterrupt):
            tracking.close()
    finally:
        signal.signal(signal.SIGINT, before)
    run = client.get_run(parent)
    assert made == [True] and run.info.status == "FINISHED" and run.data.tags["job_states"] == "none"
