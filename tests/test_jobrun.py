"""claim_run: what a job does with its config's earlier runs, decided without processes or a store."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cifar_ablation.jobrun import CREATE, REFUSE, RESUME, SKIP, claim_run

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
