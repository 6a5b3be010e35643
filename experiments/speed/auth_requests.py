"""What MLflow's basic-auth costs its server per request: the same `mlflow server` (sqlite store, 2 workers, on
127.0.0.1) open, with basic-auth as MLflow ships it (every request checks the password's hash), and with its
credential cache (auth_cache_ttl_seconds = 60); the server's CPU time (all its processes) and the wall time of
each of N sequential `experiments/search` calls after a first one. Then the requests one job makes: a small
job of 1 and of 5 epochs through the open server, counted in its access log. The README's server recipe cites this.

    python experiments/speed/auth_requests.py [-n 20]
"""
from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import TINY, make_imagefolder  # noqa: E402
from tests.services.stack import mlflow_server  # noqa: E402  (the test stack's server, one place)


def per_request(server: dict, n: int) -> tuple[float, float]:
    """Milliseconds of the server's CPU and of wall time per request, over n requests after a first."""
    procs = [psutil.Process(server["pid"]), *psutil.Process(server["pid"]).children(recursive=True)]
    cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in procs)  # noqa: E731
    auth = base64.b64encode(f"{server['username']}:{server['password']}".encode()).decode()
    request = urllib.request.Request(server["uri"] + "/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Authorization": f"Basic {auth}"})
    urllib.request.urlopen(request, timeout=60).read()
    c, t = cpu(), time.perf_counter()
    for _ in range(n):
        urllib.request.urlopen(request, timeout=60).read()
    return (cpu() - c) / n * 1000, (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20)
    n = ap.parse_args().n
    print("| server | server CPU per request | wall per request |\n|---|---|---|")
    for name, kw in (("open (no auth)", dict(auth=False)), ("basic-auth, MLflow's default", dict(auth_cache_s=0)),
                     ("basic-auth, auth_cache_ttl_seconds = 60", dict(auth_cache_s=60))):
        root = Path(tempfile.mkdtemp())
        with mlflow_server(root, f"sqlite:///{root / 'm.db'}", host="127.0.0.1", **kw) as server:
            cpu_ms, wall_ms = per_request(server, n)
        print(f"| {name} | {cpu_ms:.0f} ms | {wall_ms:.0f} ms |")
    root = Path(tempfile.mkdtemp())
    data = [f"data.path={make_imagefolder(root, 'tar')}", "data=imagefolder", f"data.cache_dir={root / 'cache'}"]
    with mlflow_server(root, f"sqlite:///{root / 'm.db'}", auth=False, host="127.0.0.1") as server:
        made = {}
        for epochs in (1, 5):
            before = Path(server["log"]).read_text().count("HTTP/1.1")
            subprocess.run([sys.executable, "-m", "cifar_ablation", *TINY, *data, f"train.epochs={epochs}",
                            f"mlflow.tracking_uri={server['uri']}"], cwd=root, check=True, capture_output=True)
            made[epochs] = Path(server["log"]).read_text().count("HTTP/1.1") - before
    print(f"\none job (a checkpoint each epoch): {made[1]} requests for 1 epoch, {made[5]} for 5: "
          f"{made[1] - (made[5] - made[1]) / 4:.0f} to start and close, {(made[5] - made[1]) / 4:.0f} per epoch")


if __name__ == "__main__":
    main()
