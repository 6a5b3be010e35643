"""K trainer runs at once, laid out as P processes with S runs side by side in each (K = P x S), and their
aggregate images/s: the bench's concurrency figures (bench.py), the layouts a sweep can take on one GPU
(hydra/launcher=streams with hydra.launcher.processes=P; P x 1 is hydra/launcher=parallel's).

Two aggregates per layout, both all runs' training images over a wall time:
    whole    from the first run's setup to the last run's end: what a sweep this short takes;
    steady   over the window where every run is past its first epoch and none has ended (every run's images
             interpolated linearly between its epoch ends): what a long sweep sees, setup (imports, cuDNN's
             autotuning, the graph's capture) left out. Needs 3 epochs or more to have a window.
Run k trains seed k; the processes start training together (each waits until all have loaded the data). On CUDA
the GPU's utilization and power draw are sampled meanwhile (GpuUse) and averaged over the steady window: with the
processes' thread loads they say whether a layout left the GPU room (busy at low power) or filled it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from multiprocessing import connection as mp_connection
from typing import Any, Callable

import torch
from hydra import compose, initialize_config_dir

from .checks import CONF_DIR, check_command_line
from .data import Images, load_images
from .train import pick_device, training


def bench_config(args: argparse.Namespace, seed: int = 0):
    """The config of one bench run: the slide's net with --tricks, at the bench's sizes (an unknown trick: the
    CLI's ConfigError, naming the known ones)."""
    data = ["data=cifar10"] if args.data == "cifar10" else ["data=imagefolder", f"data.path={args.data}"]
    overrides = [f"trick=[{args.tricks}]", f"seed={seed}", *data,
                 f"data.subset={args.subset}", f"data.val_subset={args.val_subset}",
                 f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}", f"train.compile={args.compile}",
                 f"device={args.device}", "train.progress_every_s=0", *args.override]
    check_command_line(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def images_per_epoch(cfg: Any, images: Images) -> int:
    """Training images one epoch goes through: full batches only (the loader drops the last partial one)."""
    return (len(images.train_y) // cfg.train.batch_size) * cfg.train.batch_size


def parse(text: str, concurrent: int) -> list[tuple[int, int]]:
    """'1x9,3x3,9x1' -> [(1, 9), (3, 3), (9, 1)]; each P x S must make `concurrent` runs."""
    out = []
    for item in (t for t in text.split(",") if t):
        p, _, s = item.partition("x")
        if not (p.isdigit() and s.isdigit() and int(p) >= 1 and int(s) >= 1 and int(p) * int(s) == concurrent):
            raise ValueError(f"--layouts={text}: {item!r} must be PxS, P processes with S runs side by side each, "
                             f"P * S = --concurrent ({concurrent})")
        out.append((int(p), int(s)))
    return out


def gang(args: argparse.Namespace, seeds: range, images: Images, device: torch.device) -> list[dict]:
    """Runs of `seeds` side by side in this process (one alone: plainly); per run its start, its epoch ends
    [(time, images so far)], its last epoch's images/s, the process's load (Gang.load()) and on CUDA the
    process's peak memory."""
    from .streams import Gang, Member

    runs, g = [], Gang()
    for k in seeds:
        cfg = bench_config(args, seed=k)
        r, n = {"seed": k, "start": time.time(), "epochs": []}, images_per_epoch(cfg, images)

        def on_epoch(epoch, metrics, state, r=r, n=n):
            r["epochs"].append((time.time(), epoch * n))

        def on_end(value, error, r=r):
            if error is not None:
                raise RuntimeError(f"the bench's run of seed {r['seed']} failed") from error
            r["images_per_second"] = value["images_per_second"]
        member, _ = Member.prime(k, training(cfg, images, on_epoch, device=device), on_end)
        g.add(member)
        runs.append(r)
    while g.members:
        g.round()
    load = g.load()  # the process's: its one thread's CPU and launch shares, all its runs together
    for r in runs:
        r["process_load"] = load
        if device.type == "cuda":  # the process's peak
            r["process_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return runs


def aggregates(runs: list[dict]) -> dict:
    """The whole and steady aggregates (images/s) of runs measured by gang(), and the steady window (its start and
    end, seconds since the epoch)."""
    images = sum(r["epochs"][-1][1] for r in runs)
    start, end = min(r["start"] for r in runs), max(r["epochs"][-1][0] for r in runs)
    t0, t1 = max(r["epochs"][0][0] for r in runs), min(r["epochs"][-1][0] for r in runs)
    steady = None
    if t1 > t0:
        steady = sum(_images_at(r["epochs"], t1) - _images_at(r["epochs"], t0) for r in runs) / (t1 - t0)
    return {"aggregate_images_per_second": images / (end - start), "steady_images_per_second": steady,
            "steady_window_s": max(0.0, t1 - t0), "steady_window": [t0, t1] if t1 > t0 else None}


class GpuUse:
    """The GPU's utilization (% of the time a kernel runs, however few multiprocessors it keeps busy) and board
    power draw (W), read through NVML (torch.cuda.utilization, power_draw) every `every` s by a thread of this
    process while a layout runs. Nothing is sampled without CUDA or NVML (pynvml)."""

    def __init__(self, device: torch.device, every: float = 0.25):
        self.device, self.every, self.samples = device, every, []
        self._stop, self._thread = threading.Event(), None

    def read(self) -> tuple[float, float | None] | None:
        """(utilization %, power W or None where the board does not report it), or None without NVML."""
        try:
            busy = float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 — no NVML here: nothing to sample
            return None
        try:
            return busy, torch.cuda.power_draw(self.device) / 1000
        except Exception:  # noqa: BLE001 — e.g. NVML's "not supported" on some virtual GPUs
            return busy, None

    def __enter__(self) -> "GpuUse":
        if self.device.type == "cuda" and self.read() is not None:
            self._thread = threading.Thread(target=self._sample, name="gpu-use", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            if (got := self.read()) is not None:
                self.samples.append((time.time(), *got))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def means(self, window: list[float] | None) -> dict:
        """Mean utilization and power over the samples inside `window` ([start, end]; None: all of them)."""
        inside = [s for s in self.samples if window is None or window[0] <= s[0] <= window[1]]
        watts = [s[2] for s in inside if s[2] is not None]
        return {"gpu_busy_percent": sum(s[1] for s in inside) / len(inside) if inside else None,
                "gpu_power_w": sum(watts) / len(watts) if watts else None, "gpu_samples": len(inside)}


def gpu_text(agg: dict) -> str:
    """'; GPU busy X % at Y W' over the layout's steady window (or its whole run), or nothing where none was read."""
    if not agg.get("gpu_samples"):
        return ""
    where = "in the window" if agg.get("steady_window") else "over the run"
    power = f" at {agg['gpu_power_w']:.0f} W" if agg.get("gpu_power_w") is not None else ""
    return f"; GPU busy {agg['gpu_busy_percent']:.0f} %{power} {where}"


def loads_text(per_run: list[dict]) -> str:
    """The processes' launching threads (Gang.load()), lowest to highest over the processes: 'each process's
    thread: CPU a–b % of one core, c–d % of the wall inside CUDA graph launches' (the latter on CUDA only)."""
    loads = list({tuple(sorted(r["process_load"].items())): r["process_load"] for r in per_run}.values())

    def span(key: str) -> str:
        lo, hi = (100 * f(x[key] for x in loads) for f in (min, max))
        return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"
    text = f"each process's thread: CPU {span('cpu_share')} % of one core"
    if any(x["launch_share"] for x in loads):
        text += f", {span('launch_share')} % of the wall inside CUDA graph launches"
    return text


def _images_at(epochs: list[tuple[float, int]], t: float) -> float:
    for (ta, ia), (tb, ib) in zip(epochs, epochs[1:]):
        if ta <= t <= tb:
            return ia + (ib - ia) * (t - ta) / max(tb - ta, 1e-9)
    return float(epochs[-1][1] if t >= epochs[-1][0] else epochs[0][1])


def measure(args: argparse.Namespace, processes: int, each: int, images: Images, device: torch.device,
            process: Callable | None = None) -> dict:
    """One layout: in this process (P = 1) or P spawned processes (`process`, by default _process), the GPU's use
    sampled meanwhile."""
    with GpuUse(device) as use:
        if processes == 1:
            runs = gang(args, range(each), images, device)
        else:
            runs = _in_processes(args, processes, each, process or _process)
    agg = aggregates(runs)
    return {"layout": f"{processes}x{each}", "processes": processes, "side_by_side": each,
            "runs": processes * each, **agg, **use.means(agg["steady_window"]), "per_run": runs}


def _in_processes(args: argparse.Namespace, processes: int, each: int, process: Callable) -> list[dict]:
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    pipes, procs = {}, []
    for k in range(processes):
        receiving, sending = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=process, args=(args, range(k * each, (k + 1) * each), go, sending)))
        procs[-1].start()
        sending.close()
        pipes[receiving] = k
    ready, runs, errors = 0, [], []
    try:
        while pipes:
            for conn in mp_connection.wait(list(pipes), timeout=5):
                k = pipes[conn]
                try:
                    kind, value = conn.recv()
                except EOFError:  # it ended without a word: died (its traceback is above)
                    del pipes[conn]
                    procs[k].join(5)
                    errors.append(f"{k} (exit code {procs[k].exitcode})")
                    continue
                if kind == "ready":
                    ready += 1
                    if ready == processes:
                        go.set()
                elif kind == "done":
                    del pipes[conn]
                    runs.extend(value)
                else:
                    del pipes[conn]
                    errors.append(f"{k} ({value})")
            if errors:
                raise RuntimeError(f"concurrent process(es) {errors} died; their traceback is above")
    finally:
        for p in procs:
            if p.exitcode is None and errors:
                p.kill()
            p.join()
    return runs


def _process(args: argparse.Namespace, seeds: range, go: Any, conn: Any) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() * len(seeds) // args.concurrent))  # a share of the cores
    cfg = bench_config(args)
    images, device = load_images(cfg.data), pick_device(cfg.device, seeds.start)
    conn.send(("ready", None))
    go.wait()
    try:
        conn.send(("done", gang(args, seeds, images, device)))
    except Exception as e:  # noqa: BLE001 — reported by the parent, naming this process
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
