"""Shared fixtures: configs composed the way the app composes them, tiny synthetic datasets in each format,
the real JPEG CIFAR-10 mirror, and a runner for the real CLI."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from PIL import Image

import cifar_ablation  # noqa: F401  (registers the design_sweep resolver)

from .services.stack import free_port  # noqa: F401  (for the tests)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def load_script(rel: str):
    """A script of the repo's (experiments/...), imported as a module by its path."""
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
# The real CIFAR-10 as JPEG: $CIFAR_ABLATION_JPEG, else data/ in the checkout (where a GPU machine gets it),
# else the shared folder beside the checkout (here and in CI).
JPEG_ARCHIVE = next((p for p in (Path(os.environ.get("CIFAR_ABLATION_JPEG", "/nonexistent")),
                                 ROOT / "data" / "cifar10-jpeg.tar.gz") if p.is_file()),
                    ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
CLASSES = ["cat", "dog", "frog"]
# Small and fast for every CLI job: a two-block net on 200 training and 60 validation images. No model logged
# (torch.export and its import take 1-3 s a process): tests/test_lineage.py, the fault tests' resume and the
# GPU script's rehearsal log theirs.
TINY = ["model.widths=[8,16]", "model.dense=32", "train.batch_size=50", "train.eval_batch_size=100",
        "train.epochs=2", "device=cpu", "data.subset=200", "data.val_subset=60", "mlflow.log_model=false"]


@pytest.fixture
def make_cfg():
    def make(*overrides: str, hydra: bool = False):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)
    return make


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, made by MLflow once per session: making one (schema and migrations) takes
    ~2.5 s, paid otherwise by each test's first process."""
    db = tmp_path_factory.mktemp("store") / "empty.db"
    MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def tracking_db(tmp_path, _empty_store) -> Path:
    """This test's own new, empty tracking store: tmp_path/m.db, a copy of the session's empty store. (Tests of
    a store's creation itself point at a path with no file.)"""
    db = tmp_path / "m.db"
    shutil.copyfile(_empty_store, db)
    return db


def synthetic_images(per_class: int, seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
    """32x32 RGB images whose class is its dominant colour channel, plus noise: learnable, tiny."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"train": [], "test": []}
    for split, n in (("train", per_class), ("test", max(2, per_class // 2))):
        for c, name in enumerate(CLASSES):
            for _ in range(n):
                img = rng.integers(0, 80, (32, 32, 3))
                img[..., c] += 150
                out[split].append((name, img.astype(np.uint8)))
    return out


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_imagefolder(where: Path, kind: str = "dir", per_class: int = 20) -> Path:
    """A train/<class>/*.png, test/<class>/*.png dataset under `where`: a folder, or a .tar / .tar.gz of one."""
    images = synthetic_images(per_class)
    if kind == "dir":
        root = where / "folder"
        for split, items in images.items():
            for i, (cls, img) in enumerate(items):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                (root / split / cls / f"{i:04d}.png").write_bytes(_png(img))
        return root
    path = where / f"images.{kind}"
    with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as tar:
        for split, items in images.items():
            for i, (cls, img) in enumerate(items):
                data = _png(img)
                info = tarfile.TarInfo(f"mirror/{split}/{cls}/{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def imagefolder(tmp_path):
    """make('dir'|'tar'|'tar.gz', per_class) -> path of a train/<class>/*.png, test/<class>/*.png dataset."""
    return lambda kind="dir", per_class=20: make_imagefolder(tmp_path, kind, per_class)


def write_cifar10(folder: Path, per_batch: int = 10) -> None:
    """torchvision's cifar-10-batches-py files in folder, with per_batch random images in each batch file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


@pytest.fixture
def cifar10_root(tmp_path) -> Path:
    """torchvision's cifar-10-batches-py layout, with 10 random images per batch file."""
    write_cifar10(tmp_path / "cifar" / "cifar-10-batches-py")
    return tmp_path / "cifar"


class ArchiveServer:
    """A local HTTP server standing in for CIFAR-10's site: it serves `body` at /cifar-10-python.tar.gz (after
    `delay` seconds, as a slow network would) and counts the downloads."""

    def __init__(self, body: bytes, delay: float = 0.0):
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()

            def do_GET(self):
                if self.headers.get("Method") == "HEAD":  # torchvision's look for redirects: a GET saying so
                    return self.do_HEAD()
                with server.lock:
                    server.gets += 1
                time.sleep(server.delay)
                self.do_HEAD()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.body, self.delay, self.gets, self.lock = body, delay, 0, threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cifar-10-python.tar.gz"
        self.md5 = hashlib.md5(body).hexdigest()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def cifar10_site(tmp_path):
    """make(per_batch=10, delay=0, drop=()) -> an ArchiveServer serving CIFAR-10's archive in torchvision's
    format (cifar-10-batches-py/..., random images; `drop` leaves files out)."""
    servers = []

    def make(per_batch: int = 10, delay: float = 0.0, drop: tuple[str, ...] = ()) -> ArchiveServer:
        folder = tmp_path / f"site{len(servers)}" / "cifar-10-batches-py"
        write_cifar10(folder, per_batch)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(folder.iterdir()):
                if f.name not in drop:
                    tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
        servers.append(ArchiveServer(buf.getvalue(), delay))
        return servers[-1]

    yield make
    for s in servers:
        s.httpd.shutdown()


@pytest.fixture(scope="session")
def jpeg_cache(tmp_path_factory) -> Path:
    """One decode of the real JPEG mirror per test session, shared by the tests that read it."""
    if not JPEG_ARCHIVE.exists():
        pytest.fail(f"{JPEG_ARCHIVE} is missing: the tests need the shared CIFAR-10 JPEG mirror")
    shared = os.environ.get("CIFAR_ABLATION_TEST_CACHE")  # experiments/gpu_run.sh: one decode for all its steps
    return Path(shared) if shared else tmp_path_factory.mktemp("cache")


def run_cli(args: list[str], cwd: Path, module: str = "cifar_ablation", timeout: int = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


def runs_in(db: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id], max_results=1000))


torch.set_num_threads(min(2, torch.get_num_threads()))
