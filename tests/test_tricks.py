"""Each trick does what it says, measured on real tensors and real models."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from cifar_ablation import tricks
from cifar_ablation.model import Arch, build_model, count_parameters, kernels


def model_for(make_cfg, *names: str) -> nn.Sequential:
    cfg = make_cfg(f"trick=[{','.join(names)}]")
    return build_model(tricks.edit_arch(Arch(**OmegaConf.to_container(cfg.model)), cfg.trick))


def batch(n: int = 4000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_baseline_is_the_slides_vgg(make_cfg):
    m = model_for(make_cfg)
    convs = [x for x in m if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    assert sum(isinstance(x, nn.MaxPool2d) for x in m) == 3
    dense = [x for x in m if isinstance(x, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(128 * 4 * 4, 512), (512, 10)]
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.Dropout, nn.InstanceNorm2d)) for x in m)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_batchnorm_layers_exist(make_cfg):
    m = model_for(make_cfg, "batchnorm")
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m) == 6
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m) == 1


def test_dropout_acts_only_in_training(make_cfg):
    m = model_for(make_cfg, "dropout")
    ps = sorted(x.p for x in m if isinstance(x, nn.Dropout))
    assert ps == [0.2, 0.2, 0.2, 0.5]
    x = torch.randn(8, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), m(x))
    drop = nn.Dropout(0.5).train()
    zeros = (drop(torch.ones(100_000)) == 0).float().mean().item()
    assert abs(zeros - 0.5) < 0.01


def test_instancenorm_positions(make_cfg):
    m = model_for(make_cfg, "instancenorm")
    assert isinstance(m[0], nn.InstanceNorm2d) and m[0].affine
    cfg = make_cfg("trick=[instancenorm]", "trick.instancenorm.position=blocks")
    m = build_model(tricks.edit_arch(Arch(**OmegaConf.to_container(cfg.model)), cfg.trick))
    assert sum(isinstance(x, nn.InstanceNorm2d) for x in m) == 3
    # per-image normalization: an image's brightness no longer matters
    m0 = model_for(make_cfg, "instancenorm").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m0(x), m0(3 * x + 1), atol=1e-4)


def test_capacity_grows_the_model(make_cfg):
    small, big = model_for(make_cfg), model_for(make_cfg, "capacity")
    assert [c.out_channels for c in big if isinstance(c, nn.Conv2d)] == [64, 64, 128, 128, 256, 256]
    assert count_parameters(big) > 3 * count_parameters(small)


def test_flip_flips_about_half_the_images(make_cfg):
    cfg = make_cfg("trick=[flip]").trick
    x = batch()
    y = tricks.flip(x, cfg.flip, gen())
    flipped = (y == x.flip(3)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert bool((flipped ^ same).all())  # every image is either mirrored or untouched
    assert abs(flipped.float().mean().item() - 0.5) < 0.03


def test_noise_hits_about_half_the_images_with_std_001(make_cfg):
    cfg = make_cfg("trick=[noise]").trick
    x = batch()
    d = tricks.noise(x, cfg.noise, gen()) - x
    hit = d.flatten(1).abs().amax(1) > 0
    assert abs(hit.float().mean().item() - 0.5) < 0.03
    assert d[hit].std().item() == pytest.approx(0.01, rel=0.02)
    assert d[hit].mean().abs().item() < 1e-4


def test_crop_scales_follow_the_configured_distribution(make_cfg):
    cfg = make_cfg("trick=[crop]").trick.crop
    boxes = tricks.crop_boxes(20_000, 32, cfg, gen(), torch.device("cpu"))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / 32 ** 2
    assert boxes.min() >= 0 and boxes.max() <= 32
    assert area.min() >= 0.64 - 1e-4 and area.max() <= 1 + 1e-4
    # uniform area in [0.64, 1] has mean 0.82; rejecting boxes that do not fit (large area and far from
    # square) lowers it, as in torchvision
    assert 0.72 < area.mean().item() < 0.82
    log_ratio = (w / h).log()
    assert log_ratio.min() >= math.log(0.75) - 1e-3 and log_ratio.max() <= math.log(4 / 3) + 1e-3


def test_crop_resizes_each_box_back_to_32(make_cfg):
    cfg = make_cfg("trick=[crop]", "trick.crop.p=0").trick.crop
    x = batch(16)
    assert torch.allclose(tricks.crop(x, cfg, gen()), x, atol=1e-5)  # the full box is the identity
    cfg = make_cfg("trick=[crop]", "trick.crop.scale=[0.25,0.25]", "trick.crop.ratio=[1,1]").trick.crop
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()
    out = tricks.crop(ramp, cfg, gen())
    assert out.shape == ramp.shape
    # a 16-pixel-wide box stretched to 32 columns: the ramp's slope halves
    slope = (out[..., 1:] - out[..., :-1])[..., 2:-2].mean().item()
    assert slope == pytest.approx(0.5, abs=0.02)


def test_translate_crop_is_a_window_of_the_reflect_padded_image(make_cfg):
    cfg = make_cfg("trick=[crop]", "trick.crop.mode=translate").trick.crop
    x = batch(2000)
    out = tricks.crop(x, cfg, gen())
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)            # (n, c, 9, 9, 32, 32): every offset
    match = (windows == out[:, :, None, None]).flatten(4).all(4).all(1)  # (n, 9, 9): which offsets fit
    assert bool(match.flatten(1).any(1).all())                      # every image is one window
    dy = match.any(2).float().argmax(1)
    assert abs(dy.float().mean().item() - 4) < 0.25 and set(dy.tolist()) == set(range(9))  # uniform over 0..8
    still = make_cfg("trick=[crop]", "trick.crop.mode=translate", "trick.crop.p=0").trick.crop
    assert torch.equal(tricks.crop(x, still, gen()), x)             # p=0: the centre window, the image itself


def test_l1l2_adds_the_gradient_autograd_gives_its_term(make_cfg):
    """The term's definition, l1 * sum|W| + l2 * sum W^2 over the kernels, through autograd here; the trick adds
    its gradient after backward: the same gradient for every parameter (biases: none of the term's)."""
    cfg = make_cfg("trick=[l1l2]", "trick.l1l2.l1=0.001", "trick.l1l2.l2=0.01").trick
    m = model_for(make_cfg)
    ws = [m[i].weight for i in range(len(m)) if isinstance(m[i], (nn.Conv2d, nn.Linear))]
    assert len(kernels(m)) == len(ws) == 8
    with torch.no_grad():
        ws[0][0] = 0.0  # sign(0) = 0: autograd's subgradient of |w| at 0 too
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])

    def grads(term: bool, hook: bool) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x), y)
        if term:
            loss = loss + 0.001 * sum(w.abs().sum() for w in ws) + 0.01 * sum((w ** 2).sum() for w in ws)
        loss.backward()
        if hook:
            tricks.add_loss_gradients(m, cfg)
        return [p.grad.clone() for p in m.parameters()]

    autograd, added, plain = grads(term=True, hook=False), grads(term=False, hook=True), grads(False, False)
    for a, b in zip(autograd, added):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert not any(p.grad.requires_grad for p in m.parameters())  # the gradients stay plain tensors
    changed = [not torch.equal(a, b) for a, b in zip(added, plain)]
    assert changed == [isinstance(p, torch.Tensor) and p.dim() > 1 for p in m.parameters()]  # kernels only
    tricks.add_loss_gradients(m, make_cfg("trick=[noise]").trick)  # no loss trick: nothing added
    assert all(torch.equal(p.grad, a) for p, a in zip(m.parameters(), plain))


def test_augment_applies_only_chosen_batch_tricks(make_cfg):
    x = batch(64)
    assert torch.equal(tricks.augment(x, make_cfg("trick=[batchnorm,l1l2]").trick, gen()), x)
    assert not torch.equal(tricks.augment(x, make_cfg("trick=[noise]").trick, gen()), x)


@pytest.mark.parametrize("mode", ["resize", "translate"])
def test_the_plain_parameters_augment_as_the_config_does(make_cfg, mode):
    """tricks.plain (what a run's every step reads) holds each chosen trick's parameters as the config does, and
    the batch they make is the config's, draw for draw."""
    cfg = make_cfg("trick=[noise,flip,crop,l1l2,batchnorm]", f"trick.crop.mode={mode}").trick
    params = tricks.plain(cfg)
    assert sorted(params) == sorted(cfg) and params["crop"].scale == list(cfg.crop.scale)
    assert vars(params["crop"]) == OmegaConf.to_container(cfg.crop) and type(params["crop"].ratio) is list
    x = batch(64)
    assert torch.equal(tricks.augment(x, params, gen()), tricks.augment(x, cfg, gen()))
