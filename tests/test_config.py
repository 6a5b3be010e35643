"""Config composition, designs, and validation: every bad value fails naming its key and what is allowed."""
from __future__ import annotations

import pytest

from cifar_ablation.config import (ConfigError, check_trick_overrides, design_configs, design_sweep, ordered_tricks,
                                   rung, semantic_hash, validate)
from cifar_ablation.tricks import TRICKS

from .conftest import CONF

ORDER = ["noise", "batchnorm", "dropout", "l1l2", "flip", "crop", "instancenorm", "capacity"]


def test_every_trick_has_a_yaml_and_a_hook():
    assert sorted(p.stem for p in (CONF / "trick").glob("*.yaml")) == sorted(TRICKS) == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_each_trick_composes_alone(make_cfg, name):
    cfg = make_cfg(f"trick=[{name}]", "data=imagefolder", f"data.path={CONF}")
    assert list(cfg.trick) == [name]
    validate(cfg)


def test_tricks_compose_in_lists_and_baseline_is_empty(make_cfg):
    cfg = make_cfg("trick=[batchnorm,noise,capacity]")
    assert set(cfg.trick) == {"noise", "batchnorm", "capacity"}
    assert ordered_tricks(cfg.trick, cfg.ablation.order) == ["noise", "batchnorm", "capacity"]
    assert dict(make_cfg("trick=[]").trick) == {}
    cfg = make_cfg(f"trick=[{','.join(ORDER)}]")
    assert ordered_tricks(cfg.trick, cfg.ablation.order) == ORDER


def test_ladder_order_lives_in_config_once(make_cfg):
    cfg = make_cfg()
    assert list(cfg.ablation.order) == ORDER


@pytest.mark.parametrize("design,first,count", [("ladder", [], 9), ("leave_one_out", ORDER, 9),
                                                 ("one_at_a_time", [], 9)])
def test_designs_are_generated_from_the_order(make_cfg, design, first, count):
    sets = design_configs(design, ORDER)
    assert len(sets) == count and sets[0] == first
    cfg = make_cfg(f"experiment={design}", "ablation.order=[flip,noise]", hydra=True)
    # the experiment hands Hydra's sweeper the list generated from (here, an overridden) ablation.order
    assert cfg.ablation.design == design
    assert cfg.hydra.sweeper.params.trick == design_sweep(design, ["flip", "noise"])
    assert cfg.hydra.mode.name == "MULTIRUN"


def test_design_sweep_is_hydra_sweep_syntax():
    assert design_sweep("ladder", ["a", "b"]) == "[],[a],[a,b]"
    assert design_sweep("leave_one_out", ["a", "b"]) == "[a,b],[b],[a]"
    assert design_sweep("one_at_a_time", ["a", "b"]) == "[],[a],[b]"
    assert design_configs("ladder", ["b", "a"])[1] == ["b"]  # a custom order is honoured


def test_rung_is_the_prefix_length():
    assert rung([], ORDER) == 0
    assert rung(["noise", "batchnorm"], ORDER) == 2
    assert rung(["batchnorm"], ORDER) is None


def test_semantic_hash_ignores_device_and_tracking_but_not_seed(make_cfg):
    base = semantic_hash(make_cfg("trick=[noise]"))
    assert semantic_hash(make_cfg("trick=[noise]", "device=cpu", "mlflow.experiment=x")) == base
    assert semantic_hash(make_cfg("trick=[noise]", "seed=1")) != base
    assert semantic_hash(make_cfg("trick=[noise]", "trick.noise.std=0.02")) != base


BAD = [
    ("trick.dropout.p=1.0", "trick=[dropout]", "trick.dropout.p", "< 1"),
    ("trick.dropout.p=-0.1", "trick=[dropout]", "trick.dropout.p", ">= 0"),
    ("trick.l1l2.l1=-1e-5", "trick=[l1l2]", "trick.l1l2.l1", ">= 0"),
    ("trick.noise.std=-0.01", "trick=[noise]", "trick.noise.std", ">= 0"),
    ("trick.noise.p=1.5", "trick=[noise]", "trick.noise.p", "<= 1"),
    ("trick.crop.scale=[0.9,0.5]", "trick=[crop]", "trick.crop.scale", "a <= b"),
    ("trick.instancenorm.position=middle", "trick=[instancenorm]", "trick.instancenorm.position", "input, blocks"),
    ("trick.capacity.width_mult=0", "trick=[capacity]", "trick.capacity.width_mult", "> 0"),
    ("train.epochs=0", "trick=[]", "train.epochs", "integer >= 1"),
    ("train.batch_size=2.5", "trick=[]", "train.batch_size", "integer >= 1"),
    ("optim.lr=0", "trick=[]", "optim.lr", "> 0"),
    ("optim.name=rmsprop", "trick=[]", "optim.name", "adam, adamw, sgd"),
    ("optim.schedule=linear", "trick=[]", "optim.schedule", "onecycle, cosine, constant"),
    ("device=tpu", "trick=[]", "device", "auto, cuda, cpu"),
    ("seed=-1", "trick=[]", "seed", ">= 0"),
    ("data.subset=3", "trick=[]", "data.subset", ">= 10"),
    ("train.amp=maybe", "trick=[]", "train.amp", "true or false"),
    ("jobs_per_device=0", "trick=[]", "jobs_per_device", "integer >= 1"),
    ("ablation.order=[noise,noise]", "trick=[]", "ablation.order", "without repeats"),
    ("ablation.order=[noise,warp]", "trick=[]", "ablation.order", "known tricks"),
]


@pytest.mark.parametrize("override,tricks,key,allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_key_and_what_is_allowed(make_cfg, override, tricks, key, allowed):
    cfg = make_cfg(tricks, override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert key in str(err.value) and allowed in str(err.value)


def test_missing_data_path_is_named(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data.path=None .*cifar10-jpeg"):
        validate(make_cfg("data=imagefolder"))
    with pytest.raises(ConfigError, match="does not exist"):
        validate(make_cfg("data=imagefolder", f"data.path={tmp_path}/nowhere.tar.gz"))


def test_unknown_trick_on_the_command_line_lists_the_valid_ones():
    for argv in (["trick=[bogus]"], ["-m", "trick=[],[noise,bogus]"], ["+trick=[warp]"]):
        with pytest.raises(ConfigError) as err:
            check_trick_overrides(argv)
        assert all(t in str(err.value) for t in ORDER)
    check_trick_overrides(["trick=[noise,batchnorm]", "seed=0,1", "trick.noise.std=0.1"])
