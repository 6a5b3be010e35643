"""A run's inputs and outputs in MLflow: the splits it read as its datasets; its trained net as an MLflow model,
logged by the real CLI, loaded back the ways MLflow offers, giving the run's own numbers; one model per run
whatever interrupts it; a model that cannot be logged."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from cifar_ablation.data import load_images
from cifar_ablation.lineage import (CIFAR10_URL, NAME, datasets, fluent_store, for_inference, log_inputs,
                                    log_trained_model, save_model)
from cifar_ablation.model import Arch, build_model
from cifar_ablation.train import build

from .conftest import TINY, run_cli, runs_in

ON = [t for t in TINY if not t.startswith("mlflow.log_model")] + ["mlflow.log_model=true"]


def read(tmp_path: Path, **data):
    """load_images of a data config made of `data` (cached under tmp_path; no subsets unless given)."""
    return load_images(OmegaConf.create({"subset": None, "val_subset": None, "cache_dir": str(tmp_path / "cache"),
                                         **data}))


def models_of(client, run) -> list:
    return client.search_logged_models([run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'")


def logits_as_the_run_computes_them(client, run, cwd: Path) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The run's net from its last checkpoint, through its own loader (normalization, channels_last): the
    validation logits, the labels, and the images."""
    cfg = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", str(cwd)))
    images = load_images(cfg.data)
    net = build(cfg, images).to(memory_format=torch.channels_last)
    last = max((torch.load(client.download_artifacts(run.info.run_id, f"checkpoint/{s}", str(cwd)),
                           weights_only=True) for s in ("a.pt", "b.pt")), key=lambda s: s["epoch"])
    net.load_state_dict(last["model"])
    from cifar_ablation.data import DeviceLoader
    mean, std = images.channel_stats()
    loader = DeviceLoader(images.test_x, images.test_y, mean, std, 1000, torch.device("cpu"))
    with torch.no_grad():
        logits = torch.cat([net.eval()(x.contiguous(memory_format=torch.channels_last)) for x, _ in loader])
    return logits, images.test_y, images


def test_a_finished_run_logs_its_trained_net_as_a_model_that_gives_its_numbers(tmp_path, imagefolder, tracking_db):
    data = imagefolder("tar", per_class=40)
    res = run_cli([*ON, "data=imagefolder", f"data.path={data}", f"data.cache_dir={tmp_path}/cache",
                   "trick=[batchnorm,dropout,flip,crop,instancenorm]", "trick.instancenorm.position=input",
                   f"mlflow.tracking_uri=sqlite:///{tracking_db}", "mlflow.experiment=models"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client, (run,) = runs_in(tracking_db, "models")
    assert run.info.status == "FINISHED" and "model_error" not in run.data.tags
    (m,) = models_of(client, run)
    assert m.name == NAME and m.status == LoggedModelStatus.READY
    assert f"trained model logged: runs:/{run.info.run_id}/model (models:/{m.model_id})" in res.stdout + res.stderr
    # linked to its run, with the run's last epoch's metrics, its params and the tags that say what it is
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [m.model_id]
    assert {x.key: x.value for x in m.metrics if x.step == 2}["val_acc"] == run.data.metrics["val_acc"]
    assert m.params == run.data.params
    assert m.tags["tricks"] == "batchnorm,dropout,flip,crop,instancenorm" and m.tags["seed"] == "0"
    # its inputs: the two splits it read, each with its context, source, size and a digest of what it held
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    assert inputs["training"].name == "images.tar/train" and inputs["validation"].name == "images.tar/test"
    assert all(d.source_type == "local" and str(data) in d.source for d in inputs.values())
    assert '"features_shape": [120, 3, 32, 32]' in inputs["training"].profile  # 40 a class, 3 classes
    assert '"features_shape": [60, 3, 32, 32]' in inputs["validation"].profile
    # the model's metrics, each under the split it measures (the Models tab groups them so), each once; the
    # run's own metric rows unchanged by it (two epochs, one row each)
    on = {x.key: (x.dataset_name, x.dataset_digest) for x in m.metrics}
    assert len(on) == len(m.metrics) == len(run.data.metrics) and all(x.step == 2 for x in m.metrics)
    assert on["val_acc"] == on["val_loss"] == (inputs["validation"].name, inputs["validation"].digest)
    assert on["train_acc"] == on["train_loss"] == (inputs["training"].name, inputs["training"].digest)
    assert on["lr"] == (None, None)
    assert [x.step for x in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]

    expected, labels, images = logits_as_the_run_computes_them(client, run, tmp_path)
    with fluent_store(f"sqlite:///{tracking_db}"):
        net = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
        by_id = mlflow.pytorch.load_model(f"models:/{m.model_id}")
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    with torch.no_grad():
        got = net(images.test_x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got.argmax(1) == labels).float().mean().item() == pytest.approx(run.data.metrics["val_acc"], abs=1e-9)
    with torch.no_grad():
        assert torch.equal(by_id(images.test_x), got)  # the same model either way
    assert np.allclose(pyfunc.predict(images.test_x[:3].numpy()), got[:3].numpy(), atol=1e-6)
    with pytest.raises(MlflowException, match="enforce schema"):  # its signature: uint8 images, unnormalized
        pyfunc.predict(images.test_x[:3].float().numpy() / 255)
    assert pyfunc.metadata.metadata["classes"] == ["cat", "dog", "frog"]


def test_every_trick_exports_and_loads_with_the_same_logits(tmp_path, imagefolder):
    """The pt2 export (torch.export) of each kind of layer the tricks add, widths as the capacity trick makes them."""
    images = read(tmp_path, name="imagefolder", path=str(imagefolder("dir", per_class=4)))
    x = images.test_x
    for i, arch in enumerate([Arch(widths=[8, 16]),  # the CLI test above: the other trick layers, as input norm
                              Arch(widths=[8, 16], batchnorm=True, conv_dropout=0.2, dense_dropout=0.3,
                                   instancenorm="blocks")]):
        model = for_inference(build_model(arch).train(), images)
        for mod in model.modules():  # running statistics away from their start, as training leaves them
            if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-1, 1), mod.running_var.uniform_(0.5, 2)
        path = tmp_path / f"m{i}"
        mlflow.pytorch.save_model(model, path, input_example=x[:2].numpy())
        with torch.no_grad():
            assert torch.equal(mlflow.pytorch.load_model(str(path))(x), model(x)), arch


def test_one_model_per_run_whatever_came_between(tmp_path, imagefolder, tracking_db):
    """A relaunch after a kill that came after the model was logged keeps that model; after a kill while it was
    logged (the model left unfinished), logs it anew and deletes the unfinished one."""
    uri = f"sqlite:///{tracking_db}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("once", artifact_location=str(tmp_path / "mlruns"))
    run_id = client.create_run(exp).info.run_id
    images = read(tmp_path, name="imagefolder", path=str(imagefolder("dir", per_class=4)))
    unfinished = client.create_logged_model(exp, name=NAME, source_run_id=run_id).model_id
    net = build_model(Arch(widths=[8, 16], dense=16, num_classes=3))
    first = log_trained_model(client, uri, exp, run_id, net, images, step=1)
    assert log_trained_model(client, uri, exp, run_id, net, images, step=1) == first
    models = client.search_logged_models([exp])
    assert [(m.model_id, m.status) for m in models] == [(first, LoggedModelStatus.READY)]
    assert first != unfinished
    # a kill after the model was saved and before it was linked to its run: the relaunch links it, once
    other = client.create_run(exp).info.run_id
    client.log_metric(other, "val_acc", 0.5, step=1)
    saved = save_model(client, uri, exp, client.get_run(other), net, images)
    assert client.get_run(other).outputs.model_outputs == []
    for _ in range(2):
        assert log_trained_model(client, uri, exp, other, net, images, step=1) == saved
        assert [o.model_id for o in client.get_run(other).outputs.model_outputs] == [saved]
        assert [(x.key, x.value) for x in client.get_logged_model(saved).metrics] == [("val_acc", 0.5)]


def test_a_model_that_cannot_be_logged_leaves_the_run_finished_saying_why(tmp_path, imagefolder, tracking_db):
    data = imagefolder("dir", per_class=10)
    common = [*ON, "data=imagefolder", f"data.path={data}", f"data.cache_dir={tmp_path}/cache",
              f"mlflow.tracking_uri=sqlite:///{tracking_db}", "mlflow.experiment=unlogged"]
    first = run_cli([*common, "mlflow.log_model=false"], tmp_path)  # makes the experiment: mlruns/<id>/
    assert first.returncode == 0, first.stderr[-3000:]
    client, (plain,) = runs_in(tracking_db, "unlogged")
    assert models_of(client, plain) == []  # mlflow.log_model=false: none
    (tmp_path / "mlruns" / plain.info.experiment_id / "models").write_text("a file where the models' folder goes")
    res = run_cli([*common, "seed=1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the trained model was not logged (the run's metrics were)" in res.stdout + res.stderr
    client, runs = runs_in(tracking_db, "unlogged")
    (run,) = [r for r in runs if r.data.params["seed"] == "1"]
    assert run.info.status == "FINISHED" and "val_acc" in run.data.metrics
    assert run.data.tags["model_error"].split(":")[0] in {"NotADirectoryError", "FileExistsError", "MlflowException"}
    assert [m.status for m in models_of(client, run)] == [LoggedModelStatus.FAILED]


def test_a_splits_dataset_record_says_what_it_held(tmp_path, imagefolder, cifar10_root):
    """The digest follows the source's bytes, the split and the subset; torchvision's CIFAR-10 names its URL."""
    folder = imagefolder("dir", per_class=6)
    whole = read(tmp_path, name="imagefolder", path=str(folder))
    subset = read(tmp_path, name="imagefolder", path=str(folder), subset=9)
    (train, ctx), (test, _) = datasets(whole)
    assert ctx == "training" and train.digest != test.digest
    assert datasets(subset)[0][0].digest != train.digest and datasets(subset)[1][0].digest == test.digest
    assert datasets(read(tmp_path, name="imagefolder", path=str(folder)))[0][0].digest == train.digest  # read again: same
    cifar = read(tmp_path, name="cifar10", root=str(cifar10_root), download=False)
    (train, _), _ = datasets(cifar)
    assert (train.name, train.source.url) == ("CIFAR-10/train", CIFAR10_URL)


def _log_new_datasets(uri: str, run_id: str, start, names: int, tries: int) -> None:
    from mlflow.entities import Dataset, DatasetInput

    client = mlflow.MlflowClient(uri)
    start.wait()
    for i in range(names):
        log_inputs(client, run_id, [DatasetInput(Dataset(f"d{i}", "digest", "local", '{"uri": "x"}'))], tries=tries)


def test_runs_logging_the_same_new_datasets_at_once_all_log_them(tmp_path, tracking_db):
    """Four processes, each its own run, log the same 15 new datasets at once into one sqlite store: every run
    has all 15."""
    import multiprocessing as mp
    uri = f"sqlite:///{tracking_db}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("race", artifact_location=str(tmp_path / "mlruns"))
    runs = [client.create_run(exp).info.run_id for _ in range(4)]
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_log_new_datasets, args=(uri, r, start, 15, 5)) for r in runs]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    for r in runs:
        names = sorted(i.dataset.name for i in client.get_run(r).inputs.dataset_inputs)
        assert names == sorted(f"d{i}" for i in range(15))


class LosesTheRace:
    """A client whose store fails the first `lost` writes as MLflow's does when another process inserted the same
    dataset between its lookup and its insert (the prepared GPU run's rehearsal met it), or with `error`."""

    def __init__(self, lost: int, error: str = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.name"):
        self.lost, self.error, self.calls = lost, error, 0

    def log_inputs(self, run_id, datasets):
        self.calls += 1
        if self.calls <= self.lost:
            raise MlflowException(self.error)


def test_a_write_that_lost_the_insert_race_is_tried_again_and_only_that():
    client = LosesTheRace(lost=2)
    log_inputs(client, "run", [])
    assert client.calls == 3
    with pytest.raises(MlflowException, match="UNIQUE"):  # lost every time: its error, after `tries`
        log_inputs(LosesTheRace(lost=9), "run", [], tries=3)
    for error in ("(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint", "Duplicate entry"):
        log_inputs(LosesTheRace(lost=1, error=error), "run", [])  # PostgreSQL's and MySQL's words for it
    other = LosesTheRace(lost=1, error="RESOURCE_DOES_NOT_EXIST: run 'run' not found")
    with pytest.raises(MlflowException, match="not found"):  # any other error at once
        log_inputs(other, "run", [])
    assert other.calls == 1
