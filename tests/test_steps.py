"""The training step's switch (train.cuda_graph), its fallback and the tensor learning rate, on CPU.
The CUDA graph itself is tested where a GPU is (tests/test_gpu.py)."""
from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from cifar_ablation.checks import ConfigError
from cifar_ablation.config import validate
from cifar_ablation.data import Images
from cifar_ablation.steps import EagerStep, GraphStep, bf16_autocast, device_tags, graph_blocker
from cifar_ablation.train import make_optimizer, run_through, setup, train_epoch

from .conftest import CONF

SMALL = ["model.widths=[8,16]", "model.dense=32", "train.batch_size=32", "train.epochs=2", "device=cpu",
         "trick=[batchnorm,dropout,l1l2,flip,noise]"]
# The ladder's top rung: every trick of the one trick order (conf/config.yaml's ablation.order).
TOP = "trick=[" + ",".join(OmegaConf.load(CONF / "config.yaml").ablation.order) + "]"


def mark_accumulators(model: torch.nn.Module, record) -> tuple[str, torch.Tensor]:
    """Hooks each parameter's current AccumulateGrad node: `record(name)` should a later backward meet it (a node
    is made anew by each forward, so none should). Returns the first parameter's name and a view of it whose
    graph keeps that node alive: a control, for a test that wants one met."""
    first = None
    for name, w in model.named_parameters():
        view = w.view_as(w)  # its grad_fn leads to the parameter's current AccumulateGrad node
        view.grad_fn.next_functions[0][0].register_prehook(lambda grad, name=name: record(name))
        first = first or (name, view)
    return first


def random_images(n: int = 256, seed: int = 0) -> Images:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Images(x, y, x[:64].clone(), y[:64].clone(), [str(c) for c in range(10)], "random", "none")


@pytest.mark.parametrize("value,allowed", [("maybe", "auto, true or false"), (True, "CUDA graphs need a CUDA device")])
def test_the_switch_is_checked(make_cfg, value, allowed):
    cfg = make_cfg("device=cpu", f"train.cuda_graph={str(value).lower()}")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "train.cuda_graph" and allowed in str(err.value)
    validate(make_cfg("device=cpu", "train.cuda_graph=false"))
    validate(make_cfg("device=cpu", "train.cuda_graph=auto"))


def test_what_blocks_a_graph(make_cfg):
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert graph_blocker(make_cfg(), cuda) is None                      # Adam, eager model: capturable
    assert "optim.name=sgd" in graph_blocker(make_cfg("optim=sgd"), cuda)
    assert "train.compile" in graph_blocker(make_cfg("train.compile=true"), cuda)
    assert "cpu" in graph_blocker(make_cfg(), torch.device("cpu"))


@pytest.mark.parametrize("capability,name,bf16", [((9, 0), "NVIDIA H100 80GB HBM3", True),
                                                    ((8, 6), "NVIDIA GeForce RTX 3090", True),
                                                    ((7, 5), "Tesla T4", False), ((7, 0), "Tesla V100-SXM2-16GB", False)])
def test_bf16_autocast_where_the_gpu_has_it_float32_with_a_warning_where_not(make_cfg, monkeypatch, caplog,
                                                                             capability, name, bf16):
    """train.amp on a student's T4 or V100 (no native bf16: cuDNN's bf16 convolutions need compute capability 8.0):
    float32, said once, and the run's tags say what it trained on and in."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    with caplog.at_level(logging.WARNING, logger="cifar_ablation.steps"):
        assert bf16_autocast(make_cfg(), cuda) is bf16 and bf16_autocast(make_cfg(), cuda) is bf16
        tags = device_tags(make_cfg(), cuda)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ([] if bf16 else [f"train.amp: {name} (compute capability {capability[0]}.{capability[1]}) "
                                       "has no native bf16 (cuDNN's bf16 convolutions need 8.0 or more): training "
                                       "in float32"])
    assert tags == {"precision": "bf16 autocast" if bf16 else "float32",
                    "gpu": f"{name} (compute capability {capability[0]}.{capability[1]})"}
    assert bf16_autocast(make_cfg("train.amp=false"), cuda) is False
    assert device_tags(make_cfg(), torch.device("cpu")) == {"precision": "float32"}


def test_cpu_runs_eagerly_whatever_the_switch_says_auto(make_cfg):
    images = random_images()
    for mode in ("auto", "false"):
        p = setup(make_cfg(*SMALL, f"train.cuda_graph={mode}"), images, torch.device("cpu"))
        assert type(p.step) is EagerStep and not p.opt.param_groups[0]["capturable"]
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):  # validate() stops this earlier
        setup(make_cfg(*SMALL, "train.cuda_graph=true"), images, torch.device("cpu"))


def test_a_cpu_run_flushes_subnormal_floats_to_zero(make_cfg):
    """A loss near 0 (a test's easy images) fills the gradients and Adam's moments with subnormal floats, ~15x
    slower per op on an x86 CPU: a SLURM test's epochs took 10 s, not 0.7 (dev CPU). A CPU run flushes them."""
    can = torch.set_flush_denormal(True)  # False where the CPU cannot (x86 needs SSE3)
    torch.set_flush_denormal(False)
    assert torch.tensor([1e-40]).item() != 0.0
    try:
        setup(make_cfg(*SMALL), random_images(), torch.device("cpu"))
        assert (torch.tensor([1e-40]).item() == 0.0) == can
    finally:
        torch.set_flush_denormal(False)


def test_a_failed_capture_falls_back_to_eager_losing_nothing(make_cfg, caplog):
    """A graph step that cannot capture (here: no CUDA at all) trains on eagerly, with the reason logged, and
    gives exactly the numbers of a run that was eager from the start."""
    cfg, images = make_cfg(*SMALL), random_images()
    eager = setup(cfg, images, torch.device("cpu"))  # setup() seeds: one run after the other, not interleaved
    reference = [run_through(train_epoch(eager, e)) for e in (1, 2)]
    graph = setup(cfg, images, torch.device("cpu"))
    graph.step = GraphStep(graph, strict=False)
    with caplog.at_level(logging.WARNING):
        assert [run_through(train_epoch(graph, e)) for e in (1, 2)] == reference
    assert graph.step.fallback and graph.step.kind == "eager"
    assert "CUDA graph capture failed, training eagerly" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(eager.model.state_dict().values(), graph.model.state_dict().values()))

    strict = setup(cfg, images, torch.device("cpu"))
    strict.step = GraphStep(strict, strict=True)
    with pytest.raises(Exception):
        run_through(train_epoch(strict, 1))


def test_no_autograd_node_outlives_a_training_step(make_cfg):
    """Each parameter's AccumulateGrad node is made anew by the next step's forward: nothing (the returned loss,
    the accumulated metrics) keeps a step's autograd graph alive. A node kept alive keeps the stream it was made
    on: on CUDA, PyTorch then warns that it "does not match the stream of the node that produced the incoming
    gradient", and a graph captured on another stream would wait on it. Each node is marked by a hook after a step;
    the next step must meet none of them (and does meet the one whose graph the test itself keeps alive)."""
    p = setup(make_cfg(*SMALL[:-1], TOP), random_images(), torch.device("cpu"))
    idx = torch.arange(32)
    kept_loss = p.step(idx)
    met = []
    kept = mark_accumulators(p.model, met.append)  # the control: the first one's graph kept alive here
    p.step(idx)
    assert met == [kept[0]], met
    assert kept_loss.grad_fn is None


def test_out_of_memory_in_a_warm_up_step_is_the_runs_error_not_a_capture_failure(make_cfg, monkeypatch, caplog):
    """The eager step would run out of memory too: train.cuda_graph=auto does not retry it eagerly, nor log a
    capture failure (the job's error says what to change: tests/test_faults.py, on CUDA)."""
    def warm_up(self, idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(GraphStep, "_warm_up", warm_up)
    p = setup(make_cfg(*SMALL), random_images(), torch.device("cpu"))
    p.step = GraphStep(p, strict=False)
    with caplog.at_level(logging.WARNING), pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        run_through(train_epoch(p, 1))
    assert p.step.fallback is None and "capture failed" not in caplog.text


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_the_tensor_learning_rate_follows_the_schedule(make_cfg, schedule):
    """The graph reads the learning rate from one tensor: the schedule must fill that very tensor in place,
    with the values the float learning rate of the eager path takes."""
    cfg = make_cfg(f"optim.schedule={schedule}", "optim.lr=0.003")
    model = torch.nn.Linear(4, 2)
    opt_f, sched_f = make_optimizer(model, cfg.optim, 40)
    opt_t, sched_t = make_optimizer(model, cfg.optim, 40, graph=True)
    lr = opt_t.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt_t.param_groups[0]["capturable"]
    seen = []
    for _ in range(40):
        assert opt_t.param_groups[0]["lr"] is lr
        assert lr.item() == pytest.approx(opt_f.param_groups[0]["lr"], rel=1e-6)
        seen.append(lr.item())
        for opt, sched in ((opt_f, sched_f), (opt_t, sched_t)):
            opt.step()  # no gradients: changes nothing, but keeps the scheduler's call-order check quiet
            sched.step()
    assert len(set(seen)) == 1 if schedule == "constant" else len(set(seen)) > 30  # it stayed, or really moved


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_graph_kind_of_optimizer_steps_as_the_eager_kind(make_cfg, name):
    """A captured step's optimizer (capturable, fused, a tensor learning rate) is the same Adam as the eager
    step's: same gradients, same schedule, same parameters after each step (to float rounding)."""
    cfg = make_cfg(f"optim.name={name}", "optim.lr=0.01", "optim.weight_decay=0.01")
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    (eager, sched_e), (graph, sched_g) = (make_optimizer(m, cfg.optim, 20, graph=g)
                                          for m, g in zip(models, (False, True)))
    assert graph.param_groups[0]["fused"] and not eager.param_groups[0]["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt, sched in ((models[0], eager, sched_e), (models[1], graph, sched_g)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
            sched.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(p, p0) for p, p0 in zip(models[1].parameters(), start))  # it did step


def test_where_the_fused_adam_cannot_be_captured_it_says_why(caplog):
    """The probe that picks a captured step's Adam (fused, else the multi-tensor form) on a device where
    recording fails (the CPU: no CUDA streams): False, and a warning that names the reason."""
    from cifar_ablation.steps import fused_adam_captures

    with caplog.at_level(logging.WARNING):
        assert fused_adam_captures.__wrapped__(torch.optim.AdamW, torch.device("cpu")) is False
    assert "AdamW's fused kernel did not record into a CUDA graph here (" in caplog.text
    assert "captured steps use its multi-tensor form" in caplog.text


@pytest.mark.parametrize("saved_graph,resume_graph", [(True, False), (False, True)])
def test_a_checkpoint_resumes_on_the_other_kind_of_step(make_cfg, saved_graph, resume_graph):
    """train.cuda_graph does not change the result, so a run may resume with the other setting: the optimizer
    keeps the saved values but takes the kind (capturable, tensor or float lr) of the step that resumes it."""
    from cifar_ablation.train import checkpoint_state, restore

    cfg, images = make_cfg(*SMALL), random_images()
    saver = setup(cfg, images, torch.device("cpu"))
    saver.opt, saver.sched = make_optimizer(saver.model, cfg.optim, 100, graph=saved_graph)
    for _ in range(5):
        saver.opt.step()  # no gradients yet: only the scheduler's call-order check sees it
        saver.sched.step()
    state = {**checkpoint_state(saver, 1), "metrics": {}}
    saved_lr = float(saver.opt.param_groups[0]["lr"])
    p = setup(cfg, images, torch.device("cpu"))
    p.opt, p.sched = make_optimizer(p.model, cfg.optim, 100, graph=resume_graph)
    assert restore(p, state) == 2
    group = p.opt.param_groups[0]
    assert group["capturable"] is resume_graph and isinstance(group["lr"], torch.Tensor) is resume_graph
    assert (group["fused"] is True) is resume_graph
    assert float(group["lr"]) == pytest.approx(saved_lr)
    p.opt.step()
    p.sched.step()
    saver.opt.step()
    saver.sched.step()
    assert float(p.opt.param_groups[0]["lr"]) == pytest.approx(float(saver.opt.param_groups[0]["lr"]))


def test_the_graph_keeps_reading_its_learning_rate_tensor_whatever_the_scheduler_does(make_cfg):
    """A scheduler that assigns a new learning rate instead of filling the tensor (a custom scheduler, or a torch version that assigns) would
    leave a captured graph on a stale rate: GraphStep.schedule() copies the value into the captured tensor and
    puts that tensor back."""
    cfg, images = make_cfg(*SMALL), random_images()
    p = setup(cfg, images, torch.device("cpu"))
    p.opt, p.sched = make_optimizer(p.model, cfg.optim, 100, graph=True)
    step = GraphStep(p, strict=True)
    captured = p.opt.param_groups[0]["lr"]

    class Assigning:  # the old behaviour: a new value in the group, not an in-place fill
        def step(self):
            p.opt.param_groups[0]["lr"] = 0.0123
    p.sched = Assigning()
    step.schedule()
    assert p.opt.param_groups[0]["lr"] is captured and captured.item() == pytest.approx(0.0123)


class Replayed:
    """Stands in for a captured CUDA graph on the CPU: capture runs nothing (as on CUDA), each replay runs the
    recorded step again on the static buffers and writes its loss into the tensor the capture returned."""

    def __init__(self, step: GraphStep, batch):
        self.step, self.batch = step, batch
        step.loss = torch.zeros(())

    def replay(self) -> None:
        self.step.p.opt.zero_grad(set_to_none=True)  # the captured backward writes the gradients, never adds
        self.step.loss.copy_(self.step.ops(*self.batch()))


@pytest.mark.parametrize("batch_captures", [True, False])
def test_the_graph_path_feeds_its_static_buffers_exactly(make_cfg, monkeypatch, caplog, batch_captures):
    """The plumbing around the graph, replayed on the CPU: warm-up steps, then one capture whose only input is a
    copy of the batch's indices (the batch made inside, from the run's own generator, registered with the graph),
    or, should the batch fail to capture, the batch copied into static buffers. Either way exactly the numbers
    of the eager path, epoch after epoch (the indices of each new permutation reach the graph)."""
    cfg, images = make_cfg(*SMALL, "trick=[batchnorm,dropout,l1l2,flip,crop,noise]", "train.epochs=3"), random_images()
    eager = setup(cfg, images, torch.device("cpu"))
    reference = [run_through(train_epoch(eager, e)) for e in (1, 2, 3)]

    def record(self, batch, generators):
        if generators and not batch_captures:
            raise RuntimeError("operation not permitted when stream is capturing")
        assert generators == ([self.p.gen] if generators else [])
        return Replayed(self, batch)

    def warm_up(self, idx):  # the same eager step, without the side stream the CPU lacks
        self.warmed += 1
        return EagerStep.__call__(self, idx)

    monkeypatch.setattr(GraphStep, "_record", record)
    monkeypatch.setattr(GraphStep, "_warm_up", warm_up)
    p = setup(cfg, images, torch.device("cpu"))
    p.step = GraphStep(p, strict=True)
    with caplog.at_level(logging.INFO):
        assert [run_through(train_epoch(p, e)) for e in (1, 2, 3)] == reference
    assert p.step.kind == "cuda_graph" and p.step.batch_inside is batch_captures
    assert ("the batch could not be captured" in caplog.text) is not batch_captures
    assert ("captured as a CUDA graph after 3 eager warm-up steps (the batch inside it)" in caplog.text) \
        is batch_captures
    assert all(torch.equal(a, b) for a, b in zip(eager.model.state_dict().values(), p.model.state_dict().values()))


def test_a_diverged_run_on_a_cpu_stops_at_the_step_it_diverged(make_cfg):
    """Each step's loss is at hand on a CPU: a run whose loss turns NaN stops there, not at its epoch's end (on a
    GPU the check waits for the epoch's end: one per step would make the launching thread wait for the GPU)."""
    from cifar_ablation.train import NonFiniteLoss, train

    cfg = make_cfg(*SMALL, "optim.lr=1e30")
    with pytest.raises(NonFiniteLoss, match=r"^train loss is nan at epoch 1, step 2/8: lower optim.lr \(now 1e\+30\)"):
        train(cfg, random_images(), device=torch.device("cpu"))


@pytest.mark.parametrize("every, lines", [(1e-9, 16), (0, 0)])
def test_the_progress_line_inside_an_epoch_follows_its_setting(make_cfg, caplog, every, lines):
    """train.progress_every_s, read once per epoch (a lookup per step cost the loop ~35 us): every step past the
    interval prints a line (here all 2 x 8), 0 none."""
    from cifar_ablation.train import train

    with caplog.at_level(logging.INFO, logger="cifar_ablation.train"):
        train(make_cfg(*SMALL, f"train.progress_every_s={every}"), random_images(), device=torch.device("cpu"))
    progress = [r.getMessage() for r in caplog.records if "epoch ETA" in r.getMessage()]
    assert len(progress) == lines, progress
    assert not progress or progress[-1].startswith("epoch 2/2  step 8/8  loss ")
