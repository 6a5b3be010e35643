"""The aten ops one training step issues, per rung of the slide's ladder with its recipe
(conf/experiment/slide_ladder.yaml): a proxy for the kernels a captured step replays, one after another; on
CUDA also the kernels themselves (torch.profiler over --profile steps): how many, their summed time on the GPU
per step, and the three that take most of it; and the captured step alone: one replay's time on the GPU, a
launch's CPU time, and replays back to back. A kernel time near the replay's says the GPU is busy with the
step's kernels; far below it, it waits between them; back to back near 1e6 / launch us, the thread bounds a run.

    python experiments/speed/step_ops.py [--device cpu|cuda] [--batch-size 128] [--profile 5] [--replays 40] [--wide 3]

--wide K also replays each rung's captured step at K times the batch (CUDA): near K times the batch's replay,
the GPU is as busy as it can be with this net at this batch (larger kernels, as larger batches or a rung's seeds
trained as one wider net would make, buy nothing); near 1 time, each kernel leaves most of the GPU idle.

Each rung's real setup() on random images (the ops do not depend on them), the optimizer as a captured step
makes it (make_optimizer(graph=True)), the step eager; a TorchDispatchMode counts the ops of its second step
(the first also makes the optimizer's state). Views and copies the dispatcher sees count as ops; a CUDA
convolution's backward is one op and two or three kernels; on the CPU dropout is three ops, on CUDA one.
"""
from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_ablation.checks import CONF_DIR
from cifar_ablation.config import apply_trick_params
from cifar_ablation.data import Images
from cifar_ablation.steps import WARMUP, EagerStep
from cifar_ablation.train import make_optimizer, setup


class Ops(TorchDispatchMode):
    """Counts the aten ops dispatched while it is on (profiler markers left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += "record_function" not in func.overloadpacket.__name__
        return func(*args, **(kwargs or {}))


def random_images(n: int) -> Images:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10
    return Images(x, y, x[:100], y[:100], [str(c) for c in range(10)], "random", "random")


def parts(tricks: list[str], device: torch.device, batch_size: int, images: Images, graph: bool):
    """A rung's real setup(): its step captured (graph=True: train.cuda_graph=true), else eager with the optimizer
    a captured step has."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=slide_ladder", f"trick=[{','.join(tricks)}]", f"device={device.type}",
            f"train.batch_size={batch_size}", f"train.cuda_graph={str(graph).lower()}", "hydra.mode=RUN"])
    apply_trick_params(cfg)
    p = setup(cfg, images, device)
    if not graph:
        p.opt, p.sched = make_optimizer(p.model, cfg.optim, 100, graph=True)
        p.step = EagerStep(p)
    return p, iter(p.train_loader.indices())


def step_ops(tricks: list[str], device: torch.device, batch_size: int, images: Images,
             steps: int) -> tuple[int, str]:
    """The aten ops of one step, and the kernel columns of the table over `steps` more steps (on the CPU:
    none, the profiler runs all the same)."""
    p, batches = parts(tricks, device, batch_size, images, graph=False)
    p.step(next(batches))
    with Ops() as ops:
        p.step(next(batches))
    if steps == 0:
        return ops.n, ""
    return ops.n, kernels(lambda: p.step(next(batches)), device, steps)


def kernels(step, device: torch.device, steps: int) -> str:
    """| kernels per step | their time on the GPU per step | the three longest (share of that time) |"""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
    except Exception as e:  # noqa: BLE001 — no CUPTI here: the ops still count
        return f" – | – | the profiler failed: {type(e).__name__}: {str(e)[:80]} |"
    if not events:
        return " – | – | – |"
    spent: dict[str, float] = {}  # ms per kernel name
    for e in events:
        name = e.name().split("<")[0].split("(")[0][:48]
        spent[name] = spent.get(name, 0.0) + e.duration_ns() / 1e6
    total = sum(spent.values())
    top = ", ".join(f"{n} {100 * t / total:.0f} %" for n, t in sorted(spent.items(), key=lambda kv: -kv[1])[:3])
    return f" {len(events) / steps:.0f} | {total / steps:.3f} | {top} |"


def replays(tricks: list[str], device: torch.device, batch_size: int, images: Images,
            n: int) -> tuple[float, float, float] | str:
    """The captured step alone on the GPU (CUDA only): one replay's time on the GPU (ms), the CPU time of a
    launch (the index copy and the replay call, us), and the steps/s of n replays back to back; or why not. Back to
    back near 1000 / GPU ms: one run is bound by the GPU's run of its kernels; near 1e6 / launch us: by its thread."""
    if device.type != "cuda" or n == 0:
        return "–"
    try:
        p, batches = parts(tricks, device, batch_size, images, graph=True)
        for _ in range(WARMUP + 2):  # warm-up, capture (and its timed first replay), one more replay
            p.step(next(batches))
            p.step.schedule()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        p.step(next(batches))
        end.record()
        end.synchronize()
        one, launch, t0 = start.elapsed_time(end), 0.0, time.perf_counter()
        for _ in range(n):
            idx = next(batches)
            t = time.perf_counter()
            p.step(idx)
            launch += time.perf_counter() - t
            p.step.schedule()
        torch.cuda.synchronize(device)
        return one, 1e6 * launch / n, n / (time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 — the other columns stand
        return f"the captured step failed: {type(e).__name__}: {str(e)[:80]}"


def replay_cells(alone: tuple[float, float, float] | str, wide: tuple[float, float, float] | str | None) -> str:
    """| replay ms | launch us | steps/s back to back | the wide batch's replay ms (× the batch's) |"""
    cells = [f"{alone[0]:.3f}", f"{alone[1]:.0f}", f"{alone[2]:,.0f}"] if isinstance(alone, tuple) \
        else [alone, "–", "–"]
    both = isinstance(alone, tuple) and isinstance(wide, tuple)
    cells.append(f"{wide[0]:.3f} ({wide[0] / alone[0]:.2f}×)" if both else wide if isinstance(wide, str) else "–")
    return "".join(f" {c} |" for c in cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--profile", type=int, default=5, help="steps the kernel columns average over (0: none)")
    ap.add_argument("--replays", type=int, default=40, help="captured steps timed back to back (CUDA)")
    ap.add_argument("--wide", type=int, default=3, help="also replay the captured step at this many times the "
                    "batch (CUDA; 1: not)")
    args = ap.parse_args()
    for key in ("batch_size", "wide"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')}={getattr(args, key)}: must be an integer >= 1")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        order = list(compose(config_name="config").ablation.order)
    device = torch.device(args.device)
    wide = args.batch_size * args.wide
    images = random_images((WARMUP + 4 + max(args.profile, args.replays)) * wide)
    print(f"aten ops and CUDA kernels per training step, batch {args.batch_size}, on {device} (torch "
          f"{torch.__version__}); the captured step alone, and at batch {wide}\n| rung | adds | ops | kernels | "
          f"kernel ms | longest kernels | replay ms on the GPU | launch us | steps/s back to back | replay ms at "
          f"batch {wide} (× the batch's) |\n|---|---|---|---|---|---|---|---|---|---|")
    total = 0
    for k in range(len(order) + 1):
        n, cols = step_ops(order[:k], device, args.batch_size, images, args.profile)
        total += n
        alone = replays(order[:k], device, args.batch_size, images, args.replays)
        wider = replays(order[:k], device, wide, images, 3) if wide > args.batch_size and alone != "–" else None
        print(f"| {k} | {order[k - 1] if k else 'baseline'} | {n} |{cols or ' | | |'}{replay_cells(alone, wider)}",
              flush=True)
    print(f"| all | | {total} | | | | | | | |")


if __name__ == "__main__":
    main()
