"""The aten ops one training step issues, per rung of the slide's ladder with its recipe
(conf/experiment/slide_ladder.yaml): a proxy for the kernels a captured step replays, one after another.

    python experiments/speed/step_ops.py [--device cpu|cuda] [--batch-size 128]

Each rung's real setup() on random images (the ops do not depend on them), the optimizer as a captured step
makes it (make_optimizer(graph=True)), the step eager; a TorchDispatchMode counts the ops of its second step
(the first also makes the optimizer's state). Views and copies the dispatcher sees count as ops; a CUDA
convolution's backward is one op and two or three kernels; on the CPU dropout is three ops, on CUDA one.
"""
from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_ablation.checks import CONF_DIR
from cifar_ablation.config import apply_trick_params
from cifar_ablation.data import Images
from cifar_ablation.steps import EagerStep
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


def step_ops(tricks: list[str], device: torch.device, batch_size: int, images: Images) -> int:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=slide_ladder", f"trick=[{','.join(tricks)}]", f"device={device.type}",
            f"train.batch_size={batch_size}", "train.cuda_graph=false", "hydra.mode=RUN"])
    apply_trick_params(cfg)
    p = setup(cfg, images, device)
    p.opt, p.sched = make_optimizer(p.model, cfg.optim, 100, graph=True)
    p.step = EagerStep(p)
    batches = iter(p.train_loader.indices())
    p.step(next(batches))
    with Ops() as ops:
        p.step(next(batches))
    return ops.n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        order = list(compose(config_name="config").ablation.order)
    images, device = random_images(4 * args.batch_size), torch.device(args.device)
    print(f"aten ops per training step, batch {args.batch_size}, on {device} (torch {torch.__version__})\n"
          "| rung | adds | ops |\n|---|---|---|")
    total = 0
    for k in range(len(order) + 1):
        n = step_ops(order[:k], device, args.batch_size, images)
        total += n
        print(f"| {k} | {order[k - 1] if k else 'baseline'} | {n} |", flush=True)
    print(f"| all | | {total} |")


if __name__ == "__main__":
    main()
