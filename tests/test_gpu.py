"""The CUDA paths: the captured training step against the eager one, learning, and resume after SIGKILL.
Skipped without a GPU (CI has none); experiments/gpu_run.sh runs them first on an H100."""
from __future__ import annotations

import logging
import re
import signal
import warnings

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from cifar_ablation.data import load_images
from cifar_ablation.lineage import fluent_store
from cifar_ablation.steps import WARMUP
from cifar_ablation.train import setup, train

from .conftest import JPEG_ARCHIVE, run_cli, runs_in
from .test_faults import SAMPLE_EVERY_S, start, wait_for
from .test_steps import TOP, mark_accumulators

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA paths need a CUDA device")
CUDA = ["data=imagefolder", f"data.path={JPEG_ARCHIVE}", "data.subset=6400", "data.val_subset=1000", "device=cuda",
        "train.progress_every_s=0"]
# Without dropout: a replayed graph draws dropout's random numbers from other generator offsets than eager
# steps do, so only the dropout-free step can be compared step by step. The batch tricks are made inside the
# graph from the run's own generator, whose draws are checked exactly (test_the_batch_made_inside_...).
NO_DROPOUT = "trick=[noise,batchnorm,l1l2,flip,crop]"


def step_losses(cfg, images, steps: int) -> list[float]:
    p = setup(cfg, images, torch.device("cuda"))
    p.model.train()
    losses = []
    while len(losses) < steps:
        for idx in p.train_loader.indices():
            losses.append(p.step(idx).item())
            p.step.schedule()
            if len(losses) == steps:
                break
    return losses, p.step


def test_graph_and_eager_steps_give_the_same_loss_curve(make_cfg, jpeg_cache):
    """The graph path differs from the eager path no more than the eager path differs from itself: bf16
    autocast and cuDNN's nondeterministic backward make two eager runs of one seed drift apart too. Tolerance
    on the first 50 step losses: max gap <= max(0.05, 3 x the eager-vs-eager max gap); both gaps are printed."""
    args = [*CUDA, f"data.cache_dir={jpeg_cache}", NO_DROPOUT, "train.epochs=2"]
    images = load_images(make_cfg(*args).data)
    eager, eager_step = step_losses(make_cfg(*args, "train.cuda_graph=false"), images, 50)
    again, _ = step_losses(make_cfg(*args, "train.cuda_graph=false"), images, 50)
    graph, graph_step = step_losses(make_cfg(*args, "train.cuda_graph=true"), images, 50)
    assert eager_step.kind == "eager" and graph_step.kind == "cuda_graph" and graph_step.graph is not None
    floor = max(abs(a - b) for a, b in zip(eager, again))
    gaps = [abs(a - b) for a, b in zip(eager, graph)]
    print(f"first 50 step losses: graph vs eager max gap {max(gaps):.4f} (mean {sum(gaps) / 50:.4f}); eager vs "
          f"eager max gap {floor:.4f}; loss {eager[0]:.3f} -> {eager[-1]:.3f}; graph {graph[0]:.3f} -> {graph[-1]:.3f}")
    assert max(gaps) <= max(0.05, 3 * floor), (gaps, floor)
    assert eager[-1] < eager[0] - 0.1  # and it is a curve: the loss fell


@pytest.mark.parametrize("crop", ["resize", "translate"])
def test_a_training_step_never_waits_for_the_gpu(make_cfg, jpeg_cache, crop):
    """A step that synchronizes (a host-to-device copy of a new tensor, an .item()) holds the launching thread
    until the GPU has caught up: runs side by side on streams would take turns instead of overlapping. After
    warm-up and capture, 20 steps (batch, every trick, step, schedule) under sync debug mode "error"."""
    from cifar_ablation.steps import WARMUP

    cfg = make_cfg(*CUDA, f"data.cache_dir={jpeg_cache}", "train.epochs=1", f"trick.crop.mode={crop}", TOP)
    p = setup(cfg, load_images(cfg.data), torch.device("cuda"))
    batches = p.train_loader.indices()
    for _ in range(WARMUP + 2):  # warm-up and capture may synchronize (cuDNN's timing, the graph's setup)
        p.step(next(batches))
        p.step.schedule()
    assert p.step.kind == "cuda_graph"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            p.step(next(batches))
            p.step.schedule()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_gangs_turns_never_wait_for_the_gpu(make_cfg, jpeg_cache):
    """The launching thread of hydra/launcher=streams: a member's whole turn (its random states and stream put
    in place, the loop's next batch, the step, the schedule, the states taken back) must not wait for the GPU,
    or the members' steps take turns instead of overlapping. Two runs of the top rung as one gang; once both
    are captured (and their timed first replays, which wait, are done), 20 rounds under sync debug mode "error"."""
    from cifar_ablation.streams import Gang, Member
    from cifar_ablation.train import training

    cfgs = [make_cfg(*CUDA, f"data.cache_dir={jpeg_cache}", "train.epochs=1", TOP, f"seed={seed}") for seed in (0, 1)]
    images, gang = load_images(cfgs[0].data), Gang()
    for seed, cfg in enumerate(cfgs):
        gang.add(Member.prime(seed, training(cfg, images), lambda value, error: None)[0])
    for _ in range(WARMUP + 2):  # warm-up, capture, first replay: each may wait
        gang.round()
    assert gang.steps == 2 * (WARMUP + 2) and len(gang.members) == 2  # mid-epoch: 6400 images are 50 steps
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            gang.round()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gang.steps == 2 * (WARMUP + 22)
    gang.stop(KeyboardInterrupt())


@pytest.mark.parametrize("crop", ["resize", "translate"])
def test_the_batch_made_inside_the_graph_is_the_eager_batch(make_cfg, jpeg_cache, crop):
    """The batch tricks' random numbers come from the run's own generator, registered with the graph: each
    replay must draw exactly what the eager ops draw, step after step, and leave the generator where they do
    (so a checkpoint's generator state means the same on both paths)."""
    cfg = make_cfg(*CUDA, f"data.cache_dir={jpeg_cache}", "train.epochs=1", f"trick.crop.mode={crop}",
                   "trick=[noise,flip,crop]")
    p = setup(cfg, load_images(cfg.data), torch.device("cuda"))
    loader, gen = p.train_loader, p.gen
    idx = [i.clone() for _, i in zip(range(4), loader.indices())]
    start = gen.get_state()
    eager = [loader.batch(i)[0].clone() for i in idx]
    after = gen.get_state()
    static = idx[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy initialization), its draws given back below
        loader.batch(static)
    torch.cuda.current_stream().wait_stream(side)
    gen.set_state(start)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out, _ = loader.batch(static)
    replayed = []
    for i in idx:
        static.copy_(i)
        graph.replay()
        replayed.append(out.clone())
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))
    assert torch.equal(gen.get_state(), after)


def test_a_captured_steps_adam_is_the_fused_kernel(make_cfg):
    """The fused Adam records into a CUDA graph and replays right here, so a captured step uses it."""
    from cifar_ablation.steps import fused_adam_captures
    from cifar_ablation.train import make_optimizer

    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        assert fused_adam_captures.__wrapped__(cls, torch.device("cuda")), name
        opt, _ = make_optimizer(torch.nn.Linear(4, 2).cuda(), make_cfg(f"optim.name={name}").optim, 10, graph=True)
        assert type(opt) is cls and opt.param_groups[0]["fused"] and opt.param_groups[0]["capturable"]


def test_no_autograd_node_outlives_a_step_on_the_graph_path(make_cfg, jpeg_cache):
    """As on the CPU (tests/test_steps.py), with the top rung's tricks: each warm-up step (on its side stream) and
    the capture (on the graph's) make their parameters' AccumulateGrad nodes anew, so none carries one stream into
    the next. Each node is marked after each step; no later step may meet a mark. PyTorch's "AccumulateGrad
    node's stream does not match" warning (once per process on the second H100 run) must not come from the step:
    warned always here, not once per process, and printed with the step that raised it should it come."""
    cfg = make_cfg(*CUDA, f"data.cache_dir={jpeg_cache}", "train.cuda_graph=true", TOP)
    p = setup(cfg, load_images(cfg.data), torch.device("cuda"))
    p.model.train()
    met, mismatch = [], []
    torch.set_warn_always(True)
    try:
        for k, idx in zip(range(WARMUP + 2), p.train_loader.indices()):  # warm-ups, the capture, a replay
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                p.step(idx)
                p.step.schedule()
                torch.cuda.synchronize()
            mismatch += [f"step {k}: {w.message}"[:160] for w in caught if "AccumulateGrad" in str(w.message)]
            mark_accumulators(p.model, lambda name, k=k: met.append((k, name)))
    finally:
        torch.set_warn_always(False)
    assert p.step.kind == "cuda_graph" and p.step.graph is not None
    assert not mismatch and not met, (mismatch, met[:5])


def test_a_short_cuda_run_on_the_graph_path_learns(make_cfg, jpeg_cache, caplog):
    cfg = make_cfg(*CUDA, f"data.cache_dir={jpeg_cache}", "trick=[batchnorm,dropout,flip,crop]", "train.epochs=4")
    with caplog.at_level(logging.INFO):
        metrics = train(cfg, load_images(cfg.data), device=torch.device("cuda"))
    assert "training step captured as a CUDA graph" in caplog.text and "(the batch inside it)" in caplog.text
    timing = re.search(r"graph replay: its launch takes (\d+) us of CPU, the step ([\d.]+) ms on the GPU", caplog.text)
    assert timing and float(timing[2]) > 0, caplog.text  # printed below: what bounds one run, on this GPU
    print(f"first replay: launch {timing[1]} us of CPU, step {timing[2]} ms on the GPU")
    print(f"graph path, 4 epochs on 6,400 images: val_acc {metrics['val_acc']:.3f}, "
          f"{metrics['images_per_second']:,.0f} images/s")
    assert metrics["val_acc"] > 0.35, metrics


def test_a_killed_cuda_run_resumes_on_the_graph_path(tmp_path, jpeg_cache, tracking_db):
    """SIGKILL mid-run, relaunch: the same run resumes from its checkpoint and logs each epoch once. On CUDA
    the state is restored exactly (weights, optimizer, schedule, every RNG) but cuDNN's backward is not
    bitwise deterministic, so the final numbers are compared within a tolerance, not exactly."""
    db = tracking_db
    args = [*CUDA, f"data.cache_dir={jpeg_cache}", "trick=[batchnorm,flip]", "train.epochs=6",
            f"mlflow.tracking_uri=sqlite:///{db}"]
    proc = start([*args, "mlflow.experiment=resume"], tmp_path, env=SAMPLE_EVERY_S)
    wait_for(proc, "epoch 3/6")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run_cli([*args, "mlflow.experiment=resume"], tmp_path, env=SAMPLE_EVERY_S)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "resuming from the checkpoint of epoch" in out and "captured as a CUDA graph" in out
    client, (run,) = runs_in(db, "resume")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [1, 2, 3, 4, 5, 6]
    # MLflow's system metrics read the GPU through NVML: its use, memory and power beside the CPU's
    gpu = {k: v for k, v in run.data.metrics.items() if k.startswith("system/gpu_0_")}
    print("its last system metrics of the GPU:", gpu)
    assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= set(gpu)
    assert gpu["system/gpu_0_memory_usage_megabytes"] > 100  # this run's own tensors and CUDA context at least
    assert run.data.tags["precision"] == "bf16 autocast"  # an H100 or H200: compute capability 9.0
    assert run.data.tags["gpu"] == f"{torch.cuda.get_device_name(0)} (compute capability 9.0)", run.data.tags
    ref = run_cli([*args, "mlflow.experiment=reference"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _, (reference,) = runs_in(db, "reference")
    gap = abs(run.data.metrics["val_acc"] - reference.data.metrics["val_acc"])
    print(f"resumed vs uninterrupted val_acc: {run.data.metrics['val_acc']:.4f} vs "
          f"{reference.data.metrics['val_acc']:.4f}")
    assert gap < 0.03
    # the resumed run's trained net, logged as its one model, gives on the CPU (float32) what the run measured on
    # the GPU (bf16): its weights came off the captured graph's parameters
    assert len(client.search_logged_models([run.info.experiment_id])) == 1
    with fluent_store(f"sqlite:///{db}"):
        net = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    images = load_images(OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).data)
    with torch.no_grad():
        right = sum((net(x).argmax(1) == y).sum().item()
                    for x, y in zip(images.test_x.split(500), images.test_y.split(500)))
    print(f"its logged model on the CPU: val_acc {right / len(images.test_y):.4f}")
    assert abs(right / len(images.test_y) - run.data.metrics["val_acc"]) < 0.01


def test_runs_side_by_side_on_streams_train_as_they_do_alone(tmp_path, jpeg_cache, tracking_db):
    """hydra/launcher=streams on CUDA: three graph-path runs with dropout share one process, each on its own
    stream with its own CUDA generator state. Exact: every generator's state in each run's last checkpoint equals
    the run's state alone (so no run drew from another's dropout stream). Within cuDNN's noise: val_acc."""
    from cifar_ablation.jobrun import JobRun

    db = tracking_db
    args = ["-m", "trick=[dropout],[batchnorm,dropout],[batchnorm,dropout,flip,crop]", *CUDA,
            f"data.cache_dir={jpeg_cache}", "train.epochs=3", f"mlflow.tracking_uri=sqlite:///{db}"]
    together = run_cli([*args, "hydra/launcher=streams", "jobs_per_device=3", "mlflow.experiment=together"],
                       tmp_path)
    assert together.returncode == 0, together.stderr[-3000:]
    assert (together.stdout + together.stderr).count("captured as a CUDA graph") == 3
    alone = run_cli([*args, "mlflow.experiment=alone"], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    client, runs = runs_in(db, "together")
    _, reference = runs_in(db, "alone")
    ref = {r.data.tags["tricks"]: r for r in reference if "tricks" in r.data.tags}
    for run in [r for r in runs if "tricks" in r.data.tags]:
        mine, theirs = run, ref[run.data.tags["tricks"]]
        a, b = (JobRun(client, r.info.run_id).load_checkpoint() for r in (mine, theirs))
        for key in ("cuda_rng", "torch_rng", "gen_rng"):
            assert torch.equal(a[key], b[key]), (run.data.tags["tricks"], key)
        print(f"{run.data.tags['tricks']}: side by side val_acc {mine.data.metrics['val_acc']:.4f}, alone "
              f"{theirs.data.metrics['val_acc']:.4f}")
        assert abs(mine.data.metrics["val_acc"] - theirs.data.metrics["val_acc"]) < 0.03
