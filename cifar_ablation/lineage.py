"""A run's inputs and outputs as MLflow records them: the datasets it trained and validated on, and the model it
trained. Both show in MLflow's UI (the runs table's Datasets and Models columns, the experiment's Models tab).

Datasets: each split a run reads, logged as the run's input (MLflow's dataset tracking) with its context
(`training`, `validation`), a digest of what it holds (the source's sha256, the split, the subset taken), its
source (the archive or folder read, or torchvision's CIFAR-10 URL), schema and shape. Runs on the JPEG mirror
and runs on the original CIFAR-10 are then told apart at a glance, as are subsets: compare numbers only where the
digests agree. A relaunch logs the same inputs again, which MLflow keeps once.

The model (mlflow.log_model, on by default): one per FINISHED run. MLflow 3 keeps a model as a LoggedModel of
the run's experiment (its Models tab: each model with the run's final metrics, each under the dataset it measures,
and params), linked to the run that made it. Ours, named "model", is the net as the last epoch left it behind the
training loader's normalization (data.Normalize), on the CPU in eval mode, saved as torch.export's pt2 (no pickled
code; torch alone loads it; asked for by name: MLflow's default was pickle before 3.14, and is on Databricks):

    net = mlflow.pytorch.load_model("runs:/<run id>/model")    # or "models:/<model id>"
    logits = net(images)                                        # uint8 (N, 3, 32, 32) -> float32 (N, 10)
    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(images.numpy())

Its signature says so, its input example is two validation images, and its metadata names the classes in the
order of the outputs and the data it was trained on. On the CPU it gives the run's own validation logits to float
rounding (within 1e-5, the same predictions: tested; the run's net computed them in channels_last). A run has one
model at most: a relaunch after a kill while it was being logged replaces the unfinished one. A model that cannot
be logged leaves the run FINISHED (its metrics stand) with a `model_error` tag and a warning saying why.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from .data import Images, Normalize
from .interrupts import held

log = logging.getLogger(__name__)
NAME = "model"  # the logged model's name: runs:/<run id>/model
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision.datasets.CIFAR10.url
CONTEXTS = {"train": "training", "test": "validation"}  # the split: its context in the run's inputs


def split_names(images: Images) -> dict[str, tuple[str, str]]:
    """Each split's dataset name and digest, by split: the digest of the source's sha256, the split and its size."""
    base = "CIFAR-10" if images.source.startswith("cifar10:") else images.source.rstrip("/").rsplit("/", 1)[-1]
    return {split: (f"{base}/{split}", hashlib.sha256(
        f"{images.checksum} {split} {len(getattr(images, f'{split}_y'))}".encode()).hexdigest()[:10])
        for split in CONTEXTS}


def datasets(images: Images) -> list[Any]:
    """Each split of `images` as an MLflow dataset (a record of it, not its data): name, digest, source, schema
    and shape; [(dataset, context)]."""
    import mlflow.data
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource

    cifar10 = images.source.startswith("cifar10:")
    source = HTTPDatasetSource(CIFAR10_URL) if cifar10 else LocalArtifactDatasetSource(images.source)
    out = []
    for split, (name, digest) in split_names(images).items():
        x, y = getattr(images, f"{split}_x"), getattr(images, f"{split}_y")
        out.append((mlflow.data.from_numpy(x.numpy(), targets=y.numpy(), source=source, name=name, digest=digest),
                    CONTEXTS[split]))
    return out


def log_datasets(client: MlflowClient, run_id: str, images: Images) -> None:
    """The splits the run reads, as its inputs (logged again by a relaunch: MLflow keeps them once)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    log_inputs(client, run_id, [DatasetInput(Dataset(**ds.to_dict()), [InputTag("mlflow.data.context", ctx)])
                                for ds, ctx in datasets(images)])


DUPLICATE = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")  # sqlite, PostgreSQL, MySQL


def log_inputs(client: MlflowClient, run_id: str, inputs: list, tries: int = 5) -> None:
    """client.log_inputs, again when another process added the same dataset meanwhile. MLflow's store adds a
    dataset it has not seen by looking it up, then inserting it: runs that log the same new dataset at once (a
    sweep's processes, two launches) can both miss it, and the later insert fails on the store's unique key, its
    whole write undone (seen in the prepared GPU run's rehearsal: one of its two forms FAILED so). Tried again,
    the write finds the dataset and only links it to the run."""
    for attempt in range(tries):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as e:
            if attempt == tries - 1 or not any(d in str(e) for d in DUPLICATE):
                raise
            time.sleep(0.05 * (attempt + 1))


def for_inference(net: nn.Module, images: Images) -> nn.Sequential:
    """uint8 images in, logits out, as the run computed them: its normalization, then the net; CPU, eval mode."""
    mean, std = images.channel_stats()
    return nn.Sequential(Normalize(mean, std), net).to("cpu", memory_format=torch.contiguous_format).eval()


@contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow logs a model through its fluent API, which reads the process's tracking URI: this run's store while
    it does (everything else here names its store through an MlflowClient)."""
    import mlflow
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # a release without it: set for the process (each model logged sets it again)
        mlflow.set_tracking_uri(uri)
        yield
        return
    with _use_tracking_uri(uri):
        yield


def earlier_model(client: MlflowClient, exp_id: str, run_id: str) -> str | None:
    """The model this run logged already (a kill came after it and before the run closed), or None; a model
    left unfinished by a kill while it was logged is deleted."""
    for m in client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}' AND name = '{NAME}'"):
        if m.status == LoggedModelStatus.READY:
            return m.model_id
        client.delete_logged_model(m.model_id)
    return None


def log_trained_model(client: MlflowClient, uri: str, exp_id: str, run_id: str, net: nn.Module, images: Images,
                      step: int) -> str:
    """Log `net` (the run's trained weights) as the run's model, linked to the run with the run's metrics at
    `step` (its last epoch) as the model's; a relaunch finds the model logged before and completes its links.
    Returns the model id."""
    run = client.get_run(run_id)  # its last epoch's metrics flushed before
    model_id = earlier_model(client, exp_id, run_id) or save_model(client, uri, exp_id, run, net, images)
    link_to_run(client, run, model_id, step, images)
    return model_id


def save_model(client: MlflowClient, uri: str, exp_id: str, run: Any, net: nn.Module, images: Images) -> str:
    """The net as a new READY LoggedModel of the run's (pt2 behind the normalization, signature, example,
    metadata, the run's params and its identifying tags). Returns its id."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = for_inference(net, images)
    x = images.test_x[:2]  # two: the exported model keeps the batch size free only with an example of more than one
    with torch.no_grad():
        out = model(x)
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, *x.shape[1:]))]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, out.shape[1]))]))
    keep = ("tricks", "seed", "rung", "trick_added", "config_hash", "git_commit", "data_source", "data_checksum")
    made = client.create_logged_model(exp_id, name=NAME, source_run_id=run.info.run_id, params=run.data.params,
                                      tags={k: v for k, v in run.data.tags.items() if k in keep})
    # not given the run: MLflow would link the run's metrics without their datasets. Signals held (as the
    # tracking.Client's calls hold them): a stop waits for the model's export and its writes (1-3 s)
    with fluent_store(uri), held():
        mlflow.pytorch.log_model(
            model, name=NAME, model_id=made.model_id, signature=signature, serialization_format="pt2",
            input_example=x.numpy(), pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"classes": list(images.classes), "input": "uint8 images (N, C, H, W), unnormalized",
                      "data_source": images.source, "data_checksum": images.checksum})
    return made.model_id


def link_to_run(client: MlflowClient, run: Any, model_id: str, step: int, images: Images) -> None:
    """The model as the run's output at `step`, and the run's metrics at `step` as the model's, each against the
    split it measures (val_*: the validation split, train_*: the training split; the rest against none): the
    Models tab lists them under their datasets. (mlflow's log_model does this given the run and a step, but
    without datasets: run metrics keep none.) Once: the output, written last, says it was done; the metrics'
    rows are kept once however often they are written."""
    run_id = run.info.run_id
    if model_id in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
        return
    names = split_names(images)
    by_prefix = {"val_": names["test"], "train_": names["train"]}
    metrics = []
    for key in run.data.metrics:
        ds = next((v for k, v in by_prefix.items() if key.startswith(k)), (None, None))
        metrics += [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=ds[0],
                           dataset_digest=ds[1]) for m in client.get_metric_history(run_id, key) if m.step == step]
    client.log_batch(run_id, metrics=metrics)  # the run's own rows are these already: kept once
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=step)])


def log_or_warn(run: Any, uri: str, exp_id: str, net: nn.Module, images: Images, step: int) -> None:
    """log_trained_model for a JobRun; a failure is a warning and the run's model_error tag, not the run's end."""
    try:
        model_id = log_trained_model(run.client, uri, exp_id, run.run_id, net, images, step)
    except Exception as e:  # noqa: BLE001 — the run trained and its metrics are logged: it stays FINISHED
        log.warning("the trained model was not logged (the run's metrics were): %s: %s", type(e).__name__, e)
        run.set_tags({"model_error": f"{type(e).__name__}: {e}"[:5000]})
        return
    log.info("trained model logged: runs:/%s/%s (models:/%s)", run.run_id, NAME, model_id)
