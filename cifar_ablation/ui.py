"""The MLflow UI, opened on the ablation: `make ui` (python -m cifar_ablation.ui) serves the store and prints
the address of each experiment's runs in MLflow's model-training view, and `--screenshots DIR` drives a
headless Chromium (Playwright) through what a user does first, saving a picture of each step:

    1-sweep.png    the runs table, the latest sweep expanded: its job runs nested under it
    2-report.png   the sweep's own run: its report (the table) as its description
    3-charts.png   the chart view, runs grouped by trick set ("Group by" the tricks tag): val_acc per set
    4-models.png   the experiment's Models tab: each finished run's trained net (lineage.py), by its source run

MLflow 3.17's UI chooses its view from the address (workflowType=machine_learning) and older MLflow 3 UIs
from the experiment's mlflow.experimentKind tag, which tracking.open_experiment sets.

    python -m cifar_ablation.ui [--tracking-uri URI] [--port 5000] [--screenshots DIR --experiment NAME]
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from .checks import UserError
from .tracking import ROLE, SWEEP, default_uri, experiment_id, reader

BROWSER = "/usr/bin/chromium"  # Debian's chromium; Playwright drives it (no browser download)
# A headless Chromium on a closed network: no sandbox as root, none of its own background connections.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update"]


def runs_url(base: str, exp_id: str) -> str:
    """An experiment's runs in MLflow's model-training view."""
    return f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


@contextlib.contextmanager
def serve(tracking_uri: str, port: int, log: Path, timeout_s: float = 60) -> Iterator[str]:
    """`mlflow ui` over the store on 127.0.0.1:port until the block ends; yields its base address."""
    base = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not start on {base}; see {log}") from None
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def screenshots(url: str, sweep_name: str, group_by: str, out: Path) -> dict[str, str]:
    """Open the runs at `url`, expand the sweep named `sweep_name`, open its run, then chart the runs grouped
    by the tag `group_by`; a PNG of each step under `out`. Returns each step's visible text."""
    from playwright.sync_api import sync_playwright  # the dev extra: only for pictures and the browser test

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.goto(url)
        sweep = page.locator(".ag-row", has_text=sweep_name).first
        sweep.wait_for(timeout=60_000)
        with contextlib.suppress(Exception):  # the assistant panel, where this MLflow has one
            page.get_by_role("button", name="Close").click(timeout=2_000)
        sweep.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").click()  # expand
        page.wait_for_timeout(1_500)
        page.screenshot(path=out / "1-sweep.png")
        seen["sweep"] = page.inner_text("body")

        run_id = page.locator(".ag-row", has_text=sweep_name).first.locator("a").first.get_attribute("href")
        page.goto(url.replace("/runs?", f"/runs/{run_id.rsplit('/', 1)[-1]}?"))  # the view stays model training
        page.get_by_text("Description").first.wait_for(timeout=30_000)
        with contextlib.suppress(Exception):
            page.get_by_text("Show more").first.click(timeout=2_000)
        page.wait_for_timeout(1_500)
        page.screenshot(path=out / "2-report.png")
        seen["report"] = page.inner_text("body")

        page.goto(url)
        page.locator(".ag-row", has_text=sweep_name).first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Group by").click()
        page.get_by_role("menuitemcheckbox", name=group_by, exact=True).first.click()
        page.keyboard.press("Escape")
        page.locator("label:has(input[value=CHART])").click()
        page.get_by_placeholder("Search metric charts").fill("val_acc")
        page.get_by_text("val_acc", exact=True).first.wait_for(timeout=30_000)
        page.wait_for_timeout(3_000)
        page.screenshot(path=out / "3-charts.png")
        seen["charts"] = page.inner_text("body")

        page.goto(url.replace("/runs?", "/models?"))  # the experiment's Models tab: each run's trained net
        page.get_by_text("Source run").first.wait_for(timeout=30_000)
        with contextlib.suppress(Exception):
            page.get_by_role("button", name="Close").click(timeout=2_000)
        page.wait_for_timeout(1_500)
        page.screenshot(path=out / "4-models.png")
        seen["models"] = page.inner_text("body")
        browser.close()
    return seen


def check_port(port: int) -> None:
    """UserError where another program (another MLflow UI, say) listens on the port: `mlflow ui` would fail
    there, exiting 0, after the addresses printed had sent the user to that other program."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed one's port is free
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"port {port} on 127.0.0.1 is taken ({e.strerror}; another MLflow UI?): choose another, "
                            f"--port N (make ui PORT=N)") from None


def latest_sweep(client, experiment: str) -> tuple[str, str]:
    """(experiment id, run name of its latest sweep); LookupError when it has none or no such experiment."""
    exp_id = experiment_id(client, experiment)
    runs = client.search_runs([exp_id], f"tags.`{ROLE}` = '{SWEEP}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise LookupError(f"no sweep in experiment {experiment!r} of {client.tracking_uri} to picture: run one first")
    return exp_id, runs[0].info.run_name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cifar_ablation.ui", description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default=default_uri(),
                    help="default: MLFLOW_TRACKING_URI where set, else sqlite:///mlflow.db")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--experiment", default=None, help="with --screenshots: the experiment to picture")
    ap.add_argument("--screenshots", metavar="DIR", help="save pictures of the UI to DIR instead of serving")
    args = ap.parse_args(argv)
    served = args.tracking_uri.startswith(("http://", "https://"))  # a tracking server has its UI already
    try:
        client = reader(args.tracking_uri)
        if args.screenshots or not served:
            check_port(args.port)
        if args.screenshots:
            exp_id, sweep = latest_sweep(client, args.experiment or "cifar-ablation")
    except (UserError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.screenshots:
        with serve(args.tracking_uri, args.port, Path(tempfile.gettempdir()) / "cifar_ablation-mlflow-ui.log") as base:
            screenshots(runs_url(base, exp_id), sweep, "tricks", Path(args.screenshots))
        print(f"wrote {args.screenshots}/1-sweep.png, 2-report.png, 3-charts.png, 4-models.png")
        return 0
    base = args.tracking_uri.rstrip("/") if served else f"http://127.0.0.1:{args.port}"
    for exp in client.search_experiments():
        print(f"  {exp.name}: {runs_url(base, exp.experiment_id)}")
    if served:
        return 0
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                            "--host", "127.0.0.1", "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
