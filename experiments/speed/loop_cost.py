"""The host cost of one step of train_epoch's loop, its step stood in for: what the loop itself, the loader's indices
and the one-cycle schedule take of a launching thread's time per step (in a gang, every run's step pays it on the
one thread). No GPU needed: the device is set to a CUDA device object only for the GPU path's branches, and the
epoch's end (which would wait for the GPU) is never reached.

    python experiments/speed/loop_cost.py [--steps 4000] [--graph]

--graph: the schedule with a tensor learning rate, as a captured step has it (else a float). It also times the
batch tricks of the ladder's top rung on 2 images (an eager step makes its batch so, from Python), with their
parameters as plain values (tricks.plain, what a run reads) and, for comparison, through the config.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cifar_ablation import tricks  # noqa: E402
from cifar_ablation.checks import CONF_DIR  # noqa: E402
from cifar_ablation.data import Images  # noqa: E402
from cifar_ablation.train import make_optimizer, setup, train_epoch  # noqa: E402


class StandIn:
    """A step that does nothing but what the loop asks of every step (the schedule's step included)."""

    def __init__(self, p):
        self.p, self.loss = p, torch.zeros(())
        self.loss_sum, self.correct = torch.zeros(()), torch.zeros(())

    def reset(self) -> None:
        pass

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.loss

    def schedule(self) -> None:
        self.p.sched.step()


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--graph", action="store_true", help="a tensor learning rate, as a captured step's schedule")
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error(f"--steps={args.steps}: 4 or more (a quarter of them time the batch tricks)")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=slide_ladder", "trick=[batchnorm]", "device=cpu",
                                                       "train.batch_size=8", "train.cuda_graph=false"])
    n = 8 * args.steps
    blank = torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
    p = setup(cfg, Images(*blank, blank[0][:8], blank[1][:8], [str(c) for c in range(10)], "zeros", "none"),
              torch.device("cpu"))
    if args.graph:
        p.opt, p.sched = make_optimizer(p.model, cfg.optim, cfg.train.epochs * args.steps, graph=True)
    p.step, p.device = StandIn(p), torch.device("cuda", 0)  # nothing below touches CUDA
    warnings.filterwarnings("ignore", message="Detected call of")  # no optimizer step: nothing is trained
    steps = train_epoch(p, 1)
    t = time.perf_counter()
    for _ in range(args.steps):
        next(steps)
    per_step = (time.perf_counter() - t) / args.steps
    print(f"{args.steps} steps: {per_step * 1e6:.1f} us a step (the loop, the indices, the schedule with a "
          f"{'tensor' if args.graph else 'float'} learning rate; torch {torch.__version__})")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        top = compose(config_name="config", overrides=[f"trick=[{','.join(cfg.ablation.order)}]"]).trick
    x, gen = torch.zeros(2, 3, 32, 32), torch.Generator().manual_seed(0)
    for label, params in (("as plain values", tricks.plain(top)), ("read through the config", top)):
        for _ in range(20):
            tricks.augment(x, params, gen)
        t = time.perf_counter()
        for _ in range(args.steps // 4):
            tricks.augment(x, params, gen)
        print(f"the top rung's batch tricks on 2 images, parameters {label}: "
              f"{(time.perf_counter() - t) / (args.steps // 4) * 1e6:.0f} us")
    return per_step


if __name__ == "__main__":
    main()
