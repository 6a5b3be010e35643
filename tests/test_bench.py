"""The benchmark runs on CPU and prints both loops and their ratio (numbers, never timed asserts)."""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from cifar_ablation import tricks
from cifar_ablation.bench import main
from cifar_ablation.layouts import GpuUse, aggregates, gpu_text, loads_text, measure

from .conftest import load_script


def test_bench_prints_both_loops_the_ratio_and_the_aggregate_of_each_layout(imagefolder, capsys):
    data = imagefolder("tar", per_class=40)
    result = main(["--data", str(data), "--subset", "100", "--epochs", "3", "--batch-size", "20",
                   "--workers", "0", "--concurrent", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| textbook loop" in out and "| cifar-ablation trainer" in out and "| ratio trainer / textbook" in out
    assert "| 2 trainer runs as 1 process(es) x 2 side by side, aggregate" in out
    assert "| 2 trainer runs as 2 process(es) x 1 side by side, aggregate" in out
    assert result["textbook_images_per_second"] > 0 and result["trainer"]["images_per_second"] > 0
    assert result["ratio"] == pytest.approx(result["trainer"]["images_per_second"] / result["textbook_images_per_second"])
    assert [(r["layout"], r["runs"]) for r in result["layouts"]] == [("1x2", 2), ("2x1", 2)]
    for r in result["layouts"]:
        assert r["aggregate_images_per_second"] > 0
        assert sorted(run["seed"] for run in r["per_run"]) == [0, 1]  # seed k: run k, whichever process
        assert all([e for _, e in run["epochs"]] == [100, 200, 300] for run in r["per_run"])  # 5 batches of 20
        for run in r["per_run"]:  # each process's thread, as its gang measured it: no graph launches on a CPU
            load = run["process_load"]
            assert load["steps"] == 15 * (2 if r["layout"] == "1x2" else 1) and load["cpu_share"] > 0
            assert load["launch_share"] == 0
    assert out.count("each process's thread: CPU ") == 2 and "graph launches" not in out
    assert all(r["gpu_samples"] == 0 for r in result["layouts"]) and "GPU busy" not in out  # no NVML to read


def test_the_processes_loads_are_given_as_their_range_once_per_process():
    """Runs of one process share its load (their dicts equal); the line spans the processes, lowest to highest."""
    a = {"steps": 10, "wall_s": 2.0, "cpu_share": 0.98, "launch_share": 0.61}
    b = {"steps": 12, "wall_s": 2.0, "cpu_share": 0.4, "launch_share": 0.05}
    runs = [{"process_load": dict(a)}, {"process_load": dict(a)}, {"process_load": dict(b)}]
    assert loads_text(runs) == "each process's thread: CPU 40–98 % of one core, 5–61 % of the wall inside CUDA " \
                               "graph launches"
    assert loads_text(runs[:2]) == "each process's thread: CPU 98 % of one core, 61 % of the wall inside CUDA " \
                                   "graph launches"
    assert loads_text([{"process_load": {**b, "launch_share": 0.0}}]) == "each process's thread: CPU 40 % of one core"


def test_the_steady_aggregate_counts_only_the_window_where_every_run_trains():
    """Two runs of 100 images an epoch: one from t=0 (epochs end at 10, 20, 30), one set up slower (ends at 14,
    19, 24). Window: 14 (both past epoch 1) to 24 (the first end). Run 1: 140 -> 240 images; run 2: 100 -> 300."""
    runs = [{"start": 0.0, "epochs": [(10.0, 100), (20.0, 200), (30.0, 300)]},
            {"start": 0.0, "epochs": [(14.0, 100), (19.0, 200), (24.0, 300)]}]
    a = aggregates(runs)
    assert a["steady_window_s"] == pytest.approx(10.0)
    assert a["steady_images_per_second"] == pytest.approx((240 - 140 + 300 - 100) / 10)
    assert a["aggregate_images_per_second"] == pytest.approx(600 / 30)
    assert aggregates([{"start": 0.0, "epochs": [(5.0, 100)]}])["steady_images_per_second"] is None


class SteadyGpu(GpuUse):
    def read(self):  # what NVML would say of a GPU kept 80 % busy at 250 W
        return 80.0, 250.0


def test_the_gpus_use_is_sampled_while_a_layout_runs_and_averaged_over_its_window():
    with SteadyGpu(torch.device("cuda"), every=0.01) as use:  # a device object only: no CUDA is touched
        time.sleep(0.2)
    n = len(use.samples)
    assert n >= 3 and use.means(None) == {"gpu_busy_percent": 80.0, "gpu_power_w": 250.0, "gpu_samples": n}
    time.sleep(0.05)
    assert len(use.samples) == n  # the sampler stopped with the layout
    with SteadyGpu(torch.device("cpu"), every=0.01) as use:
        time.sleep(0.05)
    assert use.samples == []  # no CUDA device: nothing read

    use.samples = [(1.0, 10.0, 100.0), (2.0, 30.0, 300.0), (3.0, 50.0, 500.0), (9.0, 90.0, 900.0)]
    window = aggregates([{"start": 0.0, "epochs": [(1.5, 10), (2.5, 20), (4.0, 30)]}])["steady_window"]
    assert window == [1.5, 4.0]
    agg = {"steady_window": window, **use.means(window)}
    assert agg["gpu_samples"] == 2 and gpu_text(agg) == "; GPU busy 40 % at 400 W in the window"
    assert gpu_text({"steady_window": None, **use.means(None)}) == "; GPU busy 45 % at 450 W over the run"
    assert gpu_text({"steady_window": [5.0, 6.0], **use.means([5.0, 6.0])}) == ""  # none inside
    use.samples = [(1.0, 10.0, None), (2.0, 30.0, None)]  # a board that reports no power
    assert gpu_text({"steady_window": None, **use.means(None)}) == "; GPU busy 20 % over the run"


def _dies(args, seeds, go, conn):  # a concurrent process that fails before it reports (as on the first H100 run)
    raise SystemExit(3)


def test_a_concurrent_process_that_dies_stops_the_bench_naming_it():
    """Not a wait without end: the first H100 run's bench waited on runs that had died until its budget ended."""
    with pytest.raises(RuntimeError, match=r"concurrent process\(es\) \['[01] \(exit code 3\)'.*died"):
        measure(argparse.Namespace(), 2, 1, None, torch.device("cpu"), process=_dies)


def test_device_crop_matches_torchvisions_random_resized_crop(make_cfg):
    """Same distribution of crop area and aspect as the reference definition (torchvision's get_params)."""
    from torchvision.transforms import RandomResizedCrop

    cfg = make_cfg("trick=[crop]").trick.crop
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(cfg.scale), list(cfg.ratio))[2:] for _ in range(5000)],
                       dtype=torch.float)  # (h, w), whole pixels
    ours = tricks.crop_boxes(5000, 32, cfg, torch.Generator().manual_seed(0),
                             torch.device("cpu"))
    w, h = ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]
    ref_area, our_area = (ref[:, 0] * ref[:, 1] / 1024), (w * h / 1024)
    for q in (0.1, 0.5, 0.9):  # quantiles agree to within torchvision's whole-pixel rounding
        assert our_area.quantile(q).item() == pytest.approx(ref_area.quantile(q).item(), abs=0.03), q
    ref_aspect, our_aspect = (ref[:, 1] / ref[:, 0]).log(), (w / h).log()
    assert our_aspect.mean().item() == pytest.approx(ref_aspect.mean().item(), abs=0.02)
    assert our_aspect.std().item() == pytest.approx(ref_aspect.std().item(), rel=0.15)


def test_a_layout_that_does_not_make_the_concurrent_runs_is_refused_before_anything_is_measured(capsys):
    with pytest.raises(SystemExit):
        main(["--concurrent", "4", "--layouts", "1x4,3x1"])
    assert "--layouts=1x4,3x1: '3x1' must be PxS, P processes with S runs side by side each, P * S = --concurrent " \
           "(4)" in capsys.readouterr().err


def test_the_textbook_loop_applies_the_noise_trick_as_the_trainer_does(make_cfg):
    """The textbook loop's transforms: the noise trick's noise on the normalized pixels of a drawn image (p=1
    here), none without the trick; validation only normalizes."""
    from PIL import Image
    from torchvision.transforms import Compose

    from cifar_ablation.bench import transforms
    from cifar_ablation.data import Images

    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = Images(x, torch.zeros(8, dtype=torch.long), x, torch.zeros(8, dtype=torch.long), ["a"], "x", "y")
    img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    plain_steps, normalize = transforms(make_cfg(), images)
    noisy_steps, _ = transforms(make_cfg("trick=[noise]", "trick.noise.p=1", "trick.noise.std=0.5"), images)
    plain, noisy = Compose(plain_steps)(img), Compose(noisy_steps)(img)
    assert torch.equal(plain, Compose(normalize)(img))
    assert (noisy - plain).std().item() == pytest.approx(0.5, rel=0.05)


def test_the_bench_trains_on_the_original_cifar10_by_default(cifar10_root, tmp_path, capsys):
    """No --data: torchvision's CIFAR-10 under data.root (downloaded there when absent; here a local copy in
    its format), and the bench says which data it measured."""
    result = main(["--subset", "40", "--val-subset", "10", "--epochs", "1", "--batch-size", "10", "--workers", "0",
                   "--concurrent", "0", "--device", "cpu",
                   "--override", f"data.root={cifar10_root}", f"data.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert f"bench: 40 images of cifar10:{cifar10_root}" in out
    assert result["args"]["data"] == "cifar10" and result["trainer"]["images_per_second"] > 0


@pytest.mark.parametrize("argv,says", [
    (["--data", "/nonexistent/cifar.tar.gz"], "data.path='/nonexistent/cifar.tar.gz' is not allowed; data.path must "
                                              "be an existing directory or archive"),
    (["--tricks", "flip,bogus"], "trick='bogus' is not allowed; trick must be a list of known tricks, from: "),
    (["--override", "train.epochs=0"], "train.epochs=0 is not allowed"),
])
def test_bad_input_stops_the_bench_with_one_line_naming_the_key(argv, says, capsys):
    """The CLI's checks, before anything is read or measured: one error line, no traceback."""
    with pytest.raises(SystemExit) as stop:
        main(["--concurrent", "0", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err and "Traceback" not in err, err


def test_step_ops_gives_the_wide_replay_against_the_batchs_and_says_why_a_cell_is_empty():
    """experiments/speed/step_ops.py's replay columns (its CUDA numbers come from the prepared GPU run): the wide
    batch's replay time and its ratio to the batch's; a failed capture's reason in its cell, the rest dashes."""
    cells = load_script("experiments/speed/step_ops.py").replay_cells
    assert cells((0.97, 35.2, 1000.4), (1.5, 40.0, 600.0)) == " 0.970 | 35 | 1,000 | 1.500 (1.55×) |"
    assert cells((0.97, 35.2, 1000.4), None) == " 0.970 | 35 | 1,000 | – |"
    assert cells((0.97, 35.2, 1000.4), "the captured step failed: X") == " 0.970 | 35 | 1,000 | the captured step " \
                                                                          "failed: X |"
    assert cells("the captured step failed: Y", None) == " the captured step failed: Y | – | – | – |"
    assert cells("–", None) == " – | – | – | – |"  # on a CPU


def test_loop_cost_times_the_loops_own_steps(capsys):
    """experiments/speed/loop_cost.py: the training loop's host cost per step, its step stood in for (a number,
    printed; NOTES.md, seventh session, has it before and after the loop stopped reading the config each step)."""
    loop_cost = load_script("experiments/speed/loop_cost.py")
    per_step = loop_cost.main(["--steps", "200", "--graph"])
    assert per_step > 0 and "200 steps: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        loop_cost.main(["--steps", "2"])
    assert "--steps=2: 4 or more" in capsys.readouterr().err
