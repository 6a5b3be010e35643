"""Config composition, designs, and validation: every bad value fails naming its key and what is allowed."""
from __future__ import annotations

import ast
import re
import shlex

import pytest
import torch
from omegaconf import OmegaConf

from cifar_ablation.checks import ConfigError, UserError, check_command_line, check_trick_overrides
from cifar_ablation.config import apply_trick_params, validate
from cifar_ablation.designs import DESIGNS, design_sweep, ordered_tricks, rung
from cifar_ablation.identity import classified, flat_params, hashes, semantic_hash
from cifar_ablation.tricks import BATCH_ORDER, TRICKS

from .conftest import CONF, ROOT

ORDER = ["noise", "batchnorm", "dropout", "l1l2", "flip", "crop", "instancenorm", "capacity"]


def test_every_trick_has_a_yaml_and_a_hook():
    assert sorted(p.stem for p in (CONF / "trick").glob("*.yaml")) == sorted(TRICKS) == sorted(ORDER)


def test_batch_tricks_run_in_their_declared_order():
    assert sorted(BATCH_ORDER) == sorted(n for n, t in TRICKS.items() if t.stage == "batch")
    assert BATCH_ORDER == ("flip", "crop", "noise")  # geometry first, noise on the final pixels


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
    sets = DESIGNS[design].configs(ORDER)
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
    assert DESIGNS["ladder"].configs(["b", "a"])[1] == ["b"]  # a custom order is honoured


def test_every_design_has_its_experiment_file():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} - {"slide_ladder"} == set(DESIGNS)
    for name, d in DESIGNS.items():
        rows = d.rows(ORDER)
        assert all(r.reference is None or 0 <= r.reference < i for i, r in enumerate(rows)), name
        assert len(rows[0].label) == len(d.label_columns), name


def test_rung_is_the_prefix_length():
    assert rung([], ORDER) == 0
    assert rung(["noise", "batchnorm"], ORDER) == 2
    assert rung(["batchnorm"], ORDER) is None


def test_semantic_hash_ignores_device_tracking_and_the_trick_order_but_not_seed(make_cfg):
    base = semantic_hash(make_cfg("trick=[noise]"))
    assert semantic_hash(make_cfg("trick=[noise]", "device=cpu", "mlflow.experiment=x")) == base
    assert semantic_hash(make_cfg("trick=[noise]", "seed=1")) != base
    assert semantic_hash(make_cfg("trick=[noise]", "trick.noise.std=0.02")) != base
    # the order says where a trick set sits in a design; the same set in any order trains the same run
    both = semantic_hash(make_cfg("trick=[noise,flip]", "ablation.order=[noise,flip]"))
    assert semantic_hash(make_cfg("trick=[flip,noise]", "ablation.order=[flip,noise]")) == both
    assert semantic_hash(make_cfg("trick=[noise]", "ablation.order=[flip,noise]")) == base
    # the values stores hold: this release's, and the one runs were tagged with while the order was part of it
    # (claim finds a store's older runs of a config by it: with the config's own order, as they were found)
    assert hashes(make_cfg("trick=[noise]")) == (base, "dd207f0d1b1b6a49") and base == "b5b292d9403e7713"
    assert hashes(make_cfg("trick=[noise]", "ablation.order=[flip,noise]"))[1] != "dd207f0d1b1b6a49"


def conf_keys() -> set[str]:
    """Every leaf key any file under conf/ can set (Hydra's own settings aside), as a dotted path."""
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                if prefix or k not in ("defaults", "hydra"):
                    walk(v, f"{prefix}{k}.")
        else:
            keys.add(prefix[:-1])
    for path in CONF.rglob("*.yaml"):
        group = path.parent.relative_to(CONF).as_posix()
        if group.startswith("hydra"):
            continue
        glob = "@package _global_" in path.read_text()
        prefix = "" if glob or group == "." else group.replace("/", ".") + "."
        walk(OmegaConf.to_container(OmegaConf.load(path)), prefix)
    return keys


def test_every_config_key_is_classified_as_changing_the_result_or_not(make_cfg):
    keys = conf_keys()
    assert {"trick.noise.std", "data.path", "data.root", "optim.betas", "train.compile", "mlflow.experiment"} <= keys
    unclassified = sorted(k for k in keys if len(classified(k)) != 1)
    assert not unclassified, ("classify these keys in cifar_ablation/identity.py, SEMANTIC or NON_SEMANTIC "
                              f"(each exactly once): {unclassified}")
    # and every param a run logs is one of them
    assert set(flat_params(make_cfg("trick=[noise,crop]"))) <= keys


def test_no_import_cycles_in_the_package():
    """Every import between the package's modules, inside functions too, forms no cycle."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "cifar_ablation").glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
    deps = {m: {d for d in ds if d in graph and d != "__init__"} for m, ds in graph.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m not in done:
            for d in deps[m]:
                visit(d, path + [m])
            done.add(m)
    for m in deps:
        visit(m, [])


BAD = [
    ("trick.dropout.p=1.0", "trick=[dropout]", "trick.dropout.p", "< 1"),
    ("trick.dropout.p=-0.1", "trick=[dropout]", "trick.dropout.p", ">= 0"),
    ("trick.l1l2.l1=-1e-5", "trick=[l1l2]", "trick.l1l2.l1", ">= 0"),
    ("trick.noise.std=-0.01", "trick=[noise]", "trick.noise.std", ">= 0"),
    ("trick.noise.p=1.5", "trick=[noise]", "trick.noise.p", "<= 1"),
    ("trick.crop.scale=[0.9,0.5]", "trick=[crop]", "trick.crop.scale", "a <= b"),
    ("trick.instancenorm.position=middle", "trick=[instancenorm]", "trick.instancenorm.position", "input, blocks"),
    ("trick.capacity.width_mult=0", "trick=[capacity]", "trick.capacity.width_mult", "> 0"),
    ("trick.crop.mode=zoom", "trick=[crop]", "trick.crop.mode", "resize, translate"),
    ("trick.crop.pad=0", "trick=[crop]", "trick.crop.pad", "integer >= 1 and <= 16"),
    ("train.epochs=0", "trick=[]", "train.epochs", "integer >= 1"),
    ("train.batch_size=2.5", "trick=[]", "train.batch_size", "integer >= 1"),
    ("optim.lr=0", "trick=[]", "optim.lr", "> 0"),
    ("optim.name=rmsprop", "trick=[]", "optim.name", "adam, adamw, sgd"),
    ("optim.schedule=linear", "trick=[]", "optim.schedule", "onecycle, cosine, constant"),
    ("device=tpu", "trick=[]", "device", "auto, cuda, cpu"),
    ("device=cuda:1", "trick=[]", "device", "auto, cuda, cpu (one GPU of several: CUDA_VISIBLE_DEVICES=N;"),
    ("seed=-1", "trick=[]", "seed", ">= 0"),
    ("data.subset=3", "trick=[]", "data.subset", ">= 10"),
    ("train.amp=maybe", "trick=[]", "train.amp", "true or false"),
    ("mlflow.log_system_metrics=sometimes", "trick=[]", "mlflow.log_system_metrics", "true or false"),
    ("jobs_per_device=0", "trick=[]", "jobs_per_device", "integer >= 1"),
    ("ablation.order=[noise,noise]", "trick=[]", "ablation.order", "without repeats"),
    ("ablation.fraction=7", "trick=[]", "ablation.fraction", "one of 3, 4, 5"),
    ("train.cuda_graph=maybe", "trick=[]", "train.cuda_graph", "auto, true or false"),
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


def test_a_sweep_for_other_machines_is_not_asked_for_this_ones_cuda_or_files(make_cfg, tmp_path, monkeypatch):
    """here=False (a SLURM sweep checked on a login node without a GPU): a CUDA device, a captured step and the
    data's file are the nodes' to have; every other value is still checked. The launcher says which."""
    from cifar_ablation.sweep import runs_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg("device=cuda", "train.cuda_graph=true", "data=imagefolder", f"data.path={tmp_path}/on-nodes.tar")
    validate(cfg, here=False)
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        validate(cfg)
    for override, key in (("optim.name=sgd", "train.cuda_graph"), ("train.epochs=0", "train.epochs")):
        with pytest.raises(ConfigError) as err:
            validate(make_cfg("device=cuda", "train.cuda_graph=true", override), here=False)
        assert err.value.key == key
    assert not runs_here(make_cfg("hydra/launcher=slurm", hydra=True))
    assert all(runs_here(make_cfg(*launcher, hydra=True)) for launcher in
               ([], ["hydra/launcher=parallel"], ["hydra/launcher=streams"], ["hydra/launcher=submitit_local"]))


def test_unknown_trick_on_the_command_line_lists_the_valid_ones():
    for argv in (["trick=[bogus]"], ["-m", "trick=[],[noise,bogus]"], ["+trick=[warp]"]):
        with pytest.raises(ConfigError) as err:
            check_trick_overrides(argv)
        assert all(t in str(err.value) for t in ORDER)
    check_trick_overrides(["trick=[noise,batchnorm]", "seed=0,1", "trick.noise.std=0.1"])


@pytest.mark.parametrize("override, says", [
    ("train.epochz=3", "train.epochz is not a key of the config; did you mean train.epochs? (train's keys: amp, "),
    ("trian.epochs=3", "trian is not a key of the config; did you mean train? (the config's top-level keys: abl"),
    ("optim.lrr=1e-3,2e-3", "optim.lrr is not a key of the config; did you mean optim.lr? (optim's keys: betas,"),
    ("trick.crop.mod=x", "trick.crop.mod is not a key of the config; did you mean trick.crop.mode? (trick.crop's"),
    ("zzz=1", "zzz is not a key of the config (the config's top-level keys: ablation, data, device, force, "),
    ("ablation.params.dropout.p=0.3", "ablation.params.dropout is not a key of the config; keys under "
                                      "ablation.params are added with a +: +ablation.params.dropout.p=0.3"),
])
def test_a_key_no_config_file_has_is_named_with_its_nearest_and_the_keys_there_are(make_cfg, override, says):
    with pytest.raises(UserError) as err:
        check_command_line(["-m", "seed=0,1", override])
    assert str(err.value).startswith("invalid config: " + says)
    with pytest.raises(Exception, match="Could not override"):  # what Hydra says, without the keys there are
        make_cfg(override.split(",")[0])


@pytest.mark.parametrize("argv, lacking", [
    (["trick.crop.mode=translate"], "trick=[] (the default)"),
    (["+trick.crop.mode=translate"], "trick=[] (the default)"),  # Hydra's own advice: crop with one parameter
    (["-m", "trick=[crop],[],[noise]", "trick.crop.mode=translate"], "trick=[], trick=[noise]"),
    (["experiment=ladder", "trick.crop.mode=translate"], "the jobs of experiment=ladder that leave it out"),
])
def test_a_parameter_of_a_trick_some_job_does_not_choose_says_where_to_set_it(make_cfg, argv, lacking):
    """Hydra fails on it naming a missing key and suggests a +, which would choose the trick with that one
    parameter; the command is refused instead, with the way that works, which composes for every job."""
    with pytest.raises(UserError) as err:
        check_command_line(argv)
    assert str(err.value) == (f"invalid config: trick.crop.mode=translate sets a parameter of the crop trick, but "
                              f"crop is not chosen by {lacking}: add it to the trick list, or set the parameter "
                              f"wherever crop is chosen: +ablation.params.crop.mode=translate")
    with pytest.raises(Exception, match="Could not override 'trick.crop.mode'"):  # what Hydra makes of it
        make_cfg("trick.crop.mode=translate")
    for tricks in ([], ["noise"], ["noise", "crop"]):  # the advice, as each job of such a sweep composes it
        cfg = make_cfg(f"trick=[{','.join(tricks)}]", "+ablation.params.crop.mode=translate")
        apply_trick_params(cfg)
        validate(cfg)
        assert OmegaConf.select(cfg, "trick.crop.mode") == ("translate" if "crop" in tricks else None)
    check_command_line(["-m", "trick=[crop],[noise,crop]", "trick.crop.mode=translate", "seed=0,1"])
    check_command_line(["trick=crop", "trick.crop.p=0.5"])


@pytest.mark.parametrize("overrides, says", [
    (["+train.epochz=3"], "train.epochz is not a key of the config; did you mean train.epochs? (train's keys: amp, "),
    (["+optim.lrr=0.01"], "optim.lrr is not a key of the config; did you mean optim.lr? (optim's keys: betas, lr, "),
    (["trick=[crop]", "+trick.crop.foo=1"], "trick.crop.foo is not a key of the config (trick.crop's keys: mode, p, "),
    (["+note=1"], "note is not a key of the config (the config's top-level keys: ablation, data, device, force, "),
])
def test_a_key_added_with_a_plus_that_nothing_reads_is_refused(make_cfg, overrides, says):
    """Hydra's advice for a misspelled key is its + form, which composes: the run would train as if the key were
    not there (optim.lrr: at the default learning rate)."""
    with pytest.raises(UserError) as err:
        validate(make_cfg(*overrides))
    assert str(err.value).startswith("invalid config: " + says) and str(err.value).endswith("; nothing would read it")
    cfg = make_cfg("experiment=slide_ladder", "trick=[crop,capacity]", "+ablation.params.crop.pad=2")
    apply_trick_params(cfg)
    validate(cfg)  # keys under ablation.params are the user's own (apply_trick_params checks them)


def test_every_documented_command_passes_the_key_check(make_cfg):
    """No false alarm: each `python -m cifar_ablation ...` of the READMEs, the Makefile and the CLI's help, and
    every kind of key Hydra takes that no file here has (its own, groups, +, ~, a list's element)."""
    docs = [ROOT / "README.md", ROOT / "Makefile", ROOT / "conf/config.yaml", *ROOT.glob("experiments/*/README.md")]
    lines = [ln for f in docs for ln in re.sub(r"\s*\\\n\s*", " ", f.read_text()).splitlines()]
    commands = [re.split(r" #|`|\s{2,}| \(", ln.split("python -m cifar_ablation ", 1)[1])[0]
                for ln in lines if "python -m cifar_ablation " in ln]
    assert len(commands) >= 15, commands
    for command in (c for c in commands if "bogus" not in c):  # the README's example of a refused trick aside
        argv = [a for a in shlex.split(command.replace("$(", "").replace(")", "")) if "$" not in a]
        check_command_line(argv)
    check_command_line(["hydra.launcher.n_jobs=3", "data=imagefolder", "optim=sgd", "experiment=ladder",
                        "+ablation.params.crop.mode=translate", "~ablation.slide", "model.widths.0=16",
                        "trick=[crop]", "trick.crop.mode=translate", "hydra/launcher=streams"])
    make_cfg("model.widths.0=16")  # Hydra takes a list's element
    check_command_line(["--config-dir", "mine", "myexp.foo=1"])  # config files of the user's own: Hydra judges
    check_command_line(["hydra.searchpath=[file://mine]", "myexp.foo=1"])
    with pytest.raises(UserError):
        check_command_line(["myexp.foo=1"])


def test_ablation_params_set_a_trick_only_where_it_is_chosen(make_cfg):
    """The slide_ladder recipe sets crop and capacity parameters for its whole sweep: the jobs that choose the
    trick get them, the others stay without the trick; a bad key or value is named before anything trains."""
    recipe = ["+ablation.params.crop.mode=translate", "+ablation.params.capacity.width_mult=4"]
    cfg = make_cfg("trick=[flip,crop,capacity]", *recipe)
    apply_trick_params(cfg)
    validate(cfg)
    assert cfg.trick.crop.mode == "translate" and cfg.trick.crop.pad == 4
    assert cfg.trick.capacity.width_mult == 4 and cfg.trick.capacity.dense_mult == 2
    without = make_cfg("trick=[flip]", *recipe)
    apply_trick_params(without)
    assert set(without.trick) == {"flip"}
    assert semantic_hash(without) == semantic_hash(make_cfg("trick=[flip]"))  # the same run as without the recipe

    ladder = make_cfg("experiment=slide_ladder")
    assert ladder.ablation.params.crop.mode == "translate" and ladder.ablation.params.capacity.width_mult == 4
    for bad, key, allowed in ((["+ablation.params.cropp.mode=translate"], "ablation.params", "known tricks"),
                              (["+ablation.params.crop.size=3"], "ablation.params.crop", "a parameter of crop"),
                              (["+ablation.params.crop.mode=zoom"], "trick.crop.mode", "resize")):
        cfg = make_cfg("trick=[crop]", *bad)
        with pytest.raises(ConfigError) as err:
            apply_trick_params(cfg)
            validate(cfg)
        assert err.value.key == key and allowed in str(err.value), str(err.value)
