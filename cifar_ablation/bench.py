"""Benchmark: the textbook PyTorch loop against cifar-ablation's trainer, same model, tricks and batch size.

    python -m cifar_ablation.bench [--data cifar10|PATH] [--subset N] [--epochs E] [--batch-size B] [--workers W]
                                   [--concurrent K] [--device auto|cpu|cuda] [--tricks a,b] [--compile]

textbook:  torchvision-style Dataset of PIL images + DataLoader(W workers, pinned memory on CUDA), PIL
           RandomHorizontalFlip + RandomResizedCrop, ToTensor, Normalize (+ the noise trick's noise); fp32; the
           l1l2 term added to the loss; one optimizer step per batch.
trainer:   cifar_ablation.train.train(): the split held on the device, batched device-side augmentation,
           channels_last, bf16 autocast on CUDA (and torch.compile with --compile).
Both report training images/s over whole epochs (augmentation included, evaluation and compilation not);
the last epoch of each counts, so --epochs 2 or more leaves warm-up out. Then K trainer runs at once in each
of --layouts, P processes with S runs side by side in each (PxS; a CUDA stream each, streams.py), their
aggregate images/s printed, whole and steady (layouts.py): 1xK is hydra/launcher=streams, Kx1 one process per
run (sharing a GPU only through MPS, where it runs), PxS hydra.launcher.processes=P. Small sizes by default,
so it runs on a CPU; on a GPU use e.g. --subset 50000 --epochs 4 --workers 8 --concurrent 9
--layouts 1x9,3x3,9x1.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .checks import UserError
from .config import validate
from .data import Images, load_images
from .layouts import bench_config, gpu_text, loads_text, measure, parse
from .model import kernels
from .stats import compare, summary
from .train import build, make_optimizer, pick_device, train


class PILImages(Dataset):
    """The textbook dataset: one PIL image per item, transformed on the fly in the loader's workers."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i].permute(1, 2, 0).numpy())), int(self.y[i])


def _noise(x: torch.Tensor, p: float, std: float) -> torch.Tensor:
    return x + (torch.rand(()) < p) * torch.randn_like(x) * std


def transforms(cfg, images: Images) -> tuple[list, list]:
    """The textbook loop's torchvision transforms for training, and the normalization alone (validation)."""
    import torchvision.transforms as T

    mean, std = images.channel_stats()
    normalize = [T.ToTensor(), T.Normalize(mean.tolist(), std.tolist())]
    steps = [T.RandomHorizontalFlip(cfg.trick.flip.p)] if "flip" in cfg.trick else []
    crop, noise = cfg.trick.get("crop"), cfg.trick.get("noise")
    if crop is not None and crop.mode == "translate":
        steps.append(T.RandomCrop(32, padding=crop.pad, padding_mode="reflect"))
    elif crop is not None:
        steps.append(T.RandomResizedCrop(32, scale=tuple(crop.scale), ratio=tuple(crop.ratio)))
    after = [T.Lambda(partial(_noise, p=noise.p, std=noise.std))] if noise is not None else []
    return [*steps, *normalize, *after], normalize


def textbook(cfg, images: Images, device: torch.device, workers: int) -> tuple[float, float]:
    """The plain path: returns (training images/s of the last epoch, final val accuracy)."""
    import torchvision.transforms as T

    train_steps, normalize = transforms(cfg, images)
    l1l2 = cfg.trick.get("l1l2")
    loader = DataLoader(PILImages(images.train_x, images.train_y, T.Compose(train_steps)),
                        batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    torch.manual_seed(cfg.seed)
    model = build(cfg, images).to(device)
    opt, sched = make_optimizer(model, cfg.optim, cfg.train.epochs * len(loader))
    rate = 0.0
    for _ in range(cfg.train.epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            if l1l2 is not None:
                ws = kernels(model)
                loss = loss + l1l2.l1 * sum(w.abs().sum() for w in ws) + l1l2.l2 * sum(w.pow(2).sum() for w in ws)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = len(loader) * cfg.train.batch_size / (time.perf_counter() - t0)
    model.eval()
    val = DataLoader(PILImages(images.test_x, images.test_y, T.Compose(normalize)), batch_size=500)
    with torch.no_grad():
        correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in val)
    return rate, correct / len(images.test_y)


def accuracy_match(args: argparse.Namespace, images: Images, device: torch.device) -> list[dict]:
    """Same recipe, both paths, args.seeds seeds: final val accuracy mean ± std and Welch's verdict."""
    rows = []
    for tricks in args.tricks_sets:
        cfg_args = argparse.Namespace(**{**vars(args), "tricks": tricks})
        plain, fast = [], []
        for seed in range(args.seeds):
            cfg = bench_config(cfg_args, seed)
            torch.manual_seed(seed)
            plain.append(100 * textbook(cfg, images, device, args.workers)[1])
            fast.append(100 * train(cfg, images, device=device)["val_acc"])
        p, f, c = summary(plain), summary(fast), compare(fast, plain)
        rows.append({"tricks": tricks, "plain": plain, "fast": fast, "delta": c.delta, "verdict": c.verdict})
        print(f"| [{tricks}] | {p.mean:.2f} ± {p.std:.2f} | {f.mean:.2f} ± {f.std:.2f} | {c.delta:+.2f} "
              f"[{c.lo:+.2f}, {c.hi:+.2f}] | {c.verdict} |", flush=True)
    return rows


def trainer(cfg, images: Images, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.init()  # a fresh process has no allocator for the device yet: resetting its stats would fail
        torch.cuda.reset_peak_memory_stats(device)
    epochs: list[dict] = []  # each epoch's metrics; the first holds compile_seconds when compiling
    t0 = time.perf_counter()
    m = train(cfg, images, on_epoch=lambda epoch, metrics, state: epochs.append(metrics), device=device)
    out = {"images_per_second": m["images_per_second"], "wall": time.perf_counter() - t0,
           "compile_seconds": epochs[0].get("compile_seconds")}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cifar_ablation.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="cifar10", help="cifar10: the original CIFAR-10 (downloaded into "
                    "data.root, ./data, once); or an image folder or archive (imagefolder format)")
    ap.add_argument("--subset", type=int, default=2000, help="training images (default 2000: CPU-sized)")
    ap.add_argument("--val-subset", type=int, default=1000, help="validation images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the textbook loop")
    ap.add_argument("--concurrent", type=int, default=2, help="trainer runs at once for the aggregate figures")
    ap.add_argument("--layouts", help="how the concurrent runs share the machine, in this order: PxS, P "
                    "processes with S runs side by side in each (a CUDA stream each); default 1xK,Kx1")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tricks", default="batchnorm,dropout,flip,crop")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trainer's model")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--accuracy", nargs="+", metavar="TRICKS", dest="tricks_sets",
                    help="instead of speed: train each comma-separated trick set ('' = baseline) on both paths "
                         "with --seeds seeds and compare their final val accuracy")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. train.epochs=4")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    args.data = args.data if args.data == "cifar10" else str(Path(args.data).resolve())
    try:  # before anything is measured
        layouts = parse(args.layouts or f"1x{args.concurrent},{args.concurrent}x1", args.concurrent) \
            if args.concurrent > 0 else []
    except ValueError as e:
        ap.error(str(e))

    try:  # the CLI's checks, then the data's own errors (absent offline, unreadable): one line each
        cfg = bench_config(args)
        validate(cfg)
        images = load_images(cfg.data)
    except UserError as e:
        ap.error(str(e))
    device = pick_device(cfg.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench: {len(images.train_y)} images of {images.source}, batch {args.batch_size}, tricks "
          f"[{args.tricks}], {args.epochs} epochs, on {where}, torch {torch.__version__}")
    if args.tricks_sets:
        print("| tricks | plain path val % | fast path val % | fast − plain [95% CI] | verdict (Welch) |\n"
              "|---|---|---|---|---|")
        return {"accuracy": accuracy_match(args, images, device)}
    base, _ = textbook(cfg, images, device, args.workers)
    print(f"| textbook loop (DataLoader, {args.workers} workers, PIL transforms, fp32) | {base:,.0f} images/s |")
    ours = trainer(cfg, images, device)
    print(f"| cifar-ablation trainer (device-side data) | {ours['images_per_second']:,.0f} images/s |")
    ratio = ours["images_per_second"] / base
    print(f"| ratio trainer / textbook | {ratio:.2f}x |")
    if ours.get("compile_seconds"):
        print(f"| compile time (not in the rate) | {ours['compile_seconds']:.1f} s |")
    result = {"device": where, "torch": torch.__version__, "args": vars(args),
              "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),  # experiments/gpu_run.sh starts MPS
              "textbook_images_per_second": base, "trainer": ours, "ratio": ratio}
    if args.json:  # now, and again after each concurrent mode: a run cut short keeps what it measured
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    result["layouts"] = []
    for processes, each in layouts:
        agg = measure(args, processes, each, images, device)
        result["layouts"].append(agg)
        steady, mem = agg["steady_images_per_second"], [r.get("process_peak_mem_gib") for r in agg["per_run"]]
        print(f"| {agg['runs']} trainer runs as {processes} process(es) x {each} side by side, aggregate | "
              f"{agg['aggregate_images_per_second']:,.0f} images/s; steady "
              + (f"{steady:,.0f} images/s over {agg['steady_window_s']:.1f} s" if steady else "– (3+ epochs)")
              + (f"; peak GPU memory per process {max(mem):.2f} GiB" if mem[0] is not None else "")
              + f"{gpu_text(agg)}; {loads_text(agg['per_run'])} |")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
