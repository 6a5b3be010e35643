"""Benchmark: the textbook PyTorch loop against cifar-ablation's trainer, same model, tricks and batch size.

    python -m cifar_ablation.bench [--data PATH] [--subset N] [--epochs E] [--batch-size B] [--workers W]
                                   [--concurrent K] [--device auto|cpu|cuda] [--tricks a,b] [--compile]

textbook:  torchvision-style Dataset of PIL images + DataLoader(W workers, pinned memory on CUDA), PIL
           RandomHorizontalFlip + RandomResizedCrop, ToTensor, Normalize; fp32; one optimizer step per batch.
trainer:   cifar_ablation.train.train(): the split held on the device, batched device-side augmentation,
           channels_last, bf16 autocast on CUDA (and torch.compile with --compile).
Both report training images/s over whole epochs (augmentation included, evaluation and compilation not);
the last epoch of each counts, so --epochs 2 or more leaves warm-up out. Then K trainer runs at once, their
aggregate images/s printed: as K separate processes (sharing a GPU only through MPS, where it runs), and as K
runs side by side in this one process, each on its own CUDA stream (streams.py, hydra/launcher=streams).
Small sizes by default, so it runs on a CPU; on a GPU use e.g. --subset 50000 --epochs 3 --workers 8
--concurrent 9.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset

from .checks import CONF_DIR
from .data import Images, load_images
from .stats import compare, summary
from .train import build, make_optimizer, pick_device, train, training

DEFAULT_DATA = "../shared/data/cifar10-jpeg.tar.gz"


def bench_config(args: argparse.Namespace, seed: int = 0):
    tricks = f"trick=[{args.tricks}]"
    overrides = [tricks, f"seed={seed}", "data=imagefolder", f"data.path={args.data}", f"data.subset={args.subset}",
                 f"data.val_subset={args.val_subset}", f"train.batch_size={args.batch_size}",
                 f"train.epochs={args.epochs}", f"train.compile={args.compile}", f"device={args.device}",
                 "train.progress_every_s=0", *args.override]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class PILImages(Dataset):
    """The textbook dataset: one PIL image per item, transformed on the fly in the loader's workers."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i].permute(1, 2, 0).numpy())), int(self.y[i])


def textbook(cfg, images: Images, device: torch.device, workers: int) -> tuple[float, float]:
    """The plain path: returns (training images/s of the last epoch, final val accuracy)."""
    import torchvision.transforms as T

    mean, std = images.channel_stats()
    normalize = [T.ToTensor(), T.Normalize(mean.tolist(), std.tolist())]
    steps = [T.RandomHorizontalFlip(cfg.trick.flip.p)] if "flip" in cfg.trick else []
    crop = cfg.trick.get("crop")
    if crop is not None and crop.mode == "translate":
        steps.append(T.RandomCrop(32, padding=crop.pad, padding_mode="reflect"))
    elif crop is not None:
        steps.append(T.RandomResizedCrop(32, scale=tuple(crop.scale), ratio=tuple(crop.ratio)))
    loader = DataLoader(PILImages(images.train_x, images.train_y, T.Compose([*steps, *normalize])),
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


def images_trained(cfg, images: Images) -> int:
    """Training images one run goes through: full batches only (the loader drops the last partial one)."""
    return cfg.train.epochs * (len(images.train_y) // cfg.train.batch_size) * cfg.train.batch_size


def _one_run(args: argparse.Namespace, slot: int, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // args.concurrent))
    cfg = bench_config(args)
    images = load_images(cfg.data)
    device = pick_device(cfg.device, slot)
    queue.put(("ready", slot, None))
    start = time.time()
    r = trainer(cfg, images, device)
    trained = images_trained(cfg, images)
    queue.put(("done", slot, {**r, "start": start, "end": time.time(), "images": trained}))


def concurrent(args: argparse.Namespace, run=_one_run) -> dict:
    """K trainer runs (`run`) as separate processes; aggregate = all images trained / the wall time they shared."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=run, args=(args, k, queue)) for k in range(args.concurrent)]
    for p in procs:
        p.start()
    results = {}
    while len(results) < args.concurrent:
        try:
            kind, slot, r = queue.get(timeout=5)
        except queue_module.Empty:  # a run that died puts nothing: stop, naming it, instead of waiting forever
            dead = [k for k, p in enumerate(procs) if p.exitcode not in (None, 0) and k not in results]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"concurrent run(s) {dead} died (exit code {procs[dead[0]].exitcode}); "
                                   "their traceback is above")
            continue
        if kind == "done":
            results[slot] = r
    for p in procs:
        p.join()
    wall = max(r["end"] for r in results.values()) - min(r["start"] for r in results.values())
    return {"runs": args.concurrent, "aggregate_images_per_second": sum(r["images"] for r in results.values()) / wall,
            "per_run": list(results.values())}


def side_by_side(args: argparse.Namespace, images: Images, device: torch.device) -> dict:
    """K trainer runs (seeds 0..K-1) in this process, each on its own CUDA stream; aggregate = all images
    trained / the wall time from the first run's setup to the last run's end."""
    from .streams import Gang, Member

    gang, ends, start = Gang(), {}, time.time()
    for k in range(args.concurrent):
        def on_end(value, error, k=k):
            ends[k] = (time.time(), value, error)
        member, _ = Member.prime(k, training(bench_config(args, seed=k), images, device=device), on_end)
        gang.add(member)
    while gang.members:
        gang.round()
    errors = [e for _, _, e in ends.values() if e is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of the side-by-side runs failed") from errors[0]
    wall = max(t for t, _, _ in ends.values()) - start
    trained = args.concurrent * images_trained(bench_config(args), images)
    print(f"side by side: {gang.pace()}")
    return {"runs": args.concurrent, "aggregate_images_per_second": trained / wall, "wall": wall,
            "per_run_last_epoch_images_per_second": [v["images_per_second"] for _, v, _ in ends.values()]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cifar_ablation.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="an image folder or archive (imagefolder format)")
    ap.add_argument("--subset", type=int, default=2000, help="training images (default 2000: CPU-sized)")
    ap.add_argument("--val-subset", type=int, default=1000, help="validation images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the textbook loop")
    ap.add_argument("--concurrent", type=int, default=2, help="trainer runs at once for the aggregate figures")
    ap.add_argument("--modes", default="streams,processes",
                    help="how the concurrent runs share the machine, in this order: streams (one process, a CUDA "
                         "stream each), processes (one process each)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tricks", default="batchnorm,dropout,flip,crop")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trainer's model")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--accuracy", nargs="+", metavar="TRICKS", dest="tricks_sets",
                    help="instead of speed: train each comma-separated trick set ('' = baseline) on both paths "
                         "with --seeds seeds and compare their final val accuracy")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. train.epochs=4")
    args = ap.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    modes = [m for m in args.modes.split(",") if m] if args.concurrent > 0 else []
    if set(modes) - {"streams", "processes"}:  # before anything is measured
        ap.error(f"--modes={args.modes}: each must be one of streams, processes")

    cfg = bench_config(args)
    images = load_images(cfg.data)
    device = pick_device(cfg.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench: {len(images.train_y)} images, batch {args.batch_size}, tricks [{args.tricks}], {args.epochs} "
          f"epochs, on {where}, torch {torch.__version__}")
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
    for mode in modes:
        if mode == "streams":
            agg = result["side_by_side"] = side_by_side(args, images, device)
            print(f"| {args.concurrent} trainer runs side by side in one process (streams), aggregate | "
                  f"{agg['aggregate_images_per_second']:,.0f} images/s |")
        else:
            agg = result["concurrent"] = concurrent(args)
            mem = [r.get("peak_mem_gib") for r in agg["per_run"]]
            extra = f", peak GPU memory per run {max(mem):.2f} GiB" if mem and mem[0] is not None else ""
            print(f"| {args.concurrent} concurrent trainer runs (processes), aggregate | "
                  f"{agg['aggregate_images_per_second']:,.0f} images/s{extra} |")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
