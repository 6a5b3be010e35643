"""The benchmark runs on CPU and prints both loops and their ratio (numbers, never timed asserts)."""
from __future__ import annotations

import pytest
import torch

from cifar_ablation import tricks
from cifar_ablation.bench import concurrent, main


def test_bench_prints_both_loops_the_ratio_and_the_aggregate(imagefolder, capsys):
    data = imagefolder("tar", per_class=40)
    result = main(["--data", str(data), "--subset", "100", "--epochs", "1", "--batch-size", "20",
                   "--workers", "0", "--concurrent", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| textbook loop" in out and "| cifar-ablation trainer" in out and "| ratio trainer / textbook" in out
    assert "| 2 concurrent trainer runs (processes), aggregate" in out
    assert "| 2 trainer runs side by side in one process (streams), aggregate" in out
    assert result["side_by_side"]["runs"] == 2 and result["side_by_side"]["aggregate_images_per_second"] > 0
    assert result["textbook_images_per_second"] > 0 and result["trainer"]["images_per_second"] > 0
    assert result["ratio"] == pytest.approx(result["trainer"]["images_per_second"] / result["textbook_images_per_second"])
    assert result["concurrent"]["runs"] == 2 and result["concurrent"]["aggregate_images_per_second"] > 0


def _dies(args, slot, queue):  # a concurrent run that fails before it reports (as on the first H100 run)
    raise SystemExit(3)


def test_a_concurrent_run_that_dies_stops_the_bench_naming_it():
    """Not a wait without end: the first H100 run's bench waited on runs that had died until its budget ended."""
    import argparse

    with pytest.raises(RuntimeError, match=r"concurrent run\(s\) \[[01].*\] died \(exit code 3\)"):
        concurrent(argparse.Namespace(concurrent=2), run=_dies)


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


def test_an_unknown_concurrency_mode_is_refused_before_anything_is_measured(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "streams,gpu"])
    assert "--modes=streams,gpu: each must be one of streams, processes" in capsys.readouterr().err
