# cifar-ablation. `make test` sets everything up from nothing, then runs the tests; `make help` lists targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MIRROR ?= ../shared/data/cifar10-jpeg.tar.gz
PORT   ?= 5000
# The data the demo, the ladder and the bench train on: the offline JPEG mirror where it is at hand, else the
# original CIFAR-10 (torchvision downloads it into ./data once). Override with e.g. DATA=cifar10 or DATA=PATH.
DATA ?= $(if $(wildcard $(MIRROR)),$(MIRROR),cifar10)
DATA_ARGS ?= $(if $(filter cifar10,$(DATA)),data=cifar10,data=imagefolder data.path=$(DATA))

.PHONY: help install services demo test test-slow ladder gpu-prep gpu-rehearse gpu-run gpu-publish report ui screenshots bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## make .venv and install the package (editable) with its dev extras

# editable_mode=compat: the checkout itself on sys.path, so that Hydra's plugin scan finds hydra_plugins/ (the
# streams launcher); the default editable mode hides namespace packages from that scan.
# PIP_FLAGS: more pip options (CI: --no-compile, see .ci/run).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat $(PIP_FLAGS)
	touch $(STAMP)

services:  ## Debian packages the tests drive (Chromium, SLURM, PostgreSQL), where missing (root + apt-get)
	bash tests/services/install.sh

demo: install  ## a small full factorial (3 tricks: 8 configurations x 2 seeds, a narrow net), then its report
	@echo "demo data: $(DATA_ARGS)"
	$(BIN)/python -m cifar_ablation experiment=factorial 'ablation.order=[batchnorm,dropout,flip]' seed=0,1 \
	    $(DATA_ARGS) data.subset=2000 data.val_subset=1000 'model.widths=[16,32,64]' model.dense=128 \
	    train.epochs=3 mlflow.experiment=demo
	$(BIN)/python -m cifar_ablation.report --experiment demo --out reports/demo
	@echo "next: the table and figures in reports/demo/; the runs in the MLflow UI: make ui (experiment 'demo');"
	@echo "      the slide's full ladder, on a GPU: make ladder"

test: install services  ## the test suite, all but the multi-process launcher tests
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

test-slow: install services  ## multi-process tests: parallel launchers, a SLURM cluster, PostgreSQL + auth server
	$(BIN)/python -m pytest -q -m slow --durations=20

# The ladder's runs side by side, LADDER_RUNS at a time (each on its own CUDA stream on a GPU), shared among
# LADDER_PROCS processes (one launching thread each; on one GPU start MPS first: nvidia-cuda-mps-control -d).
LADDER_RUNS ?= 9
LADDER_PROCS ?= 1
# On a machine without CUDA it stops, saying so, unless LADDER_DEVICE=cpu: the ladder's training steps alone take
# ~61 h on 2 CPU cores (the dev machine: one step of each rung timed at batch 128, x 3 seeds x 40 epochs x 390).
LADDER_DEVICE ?= auto
ladder: install  ## the slide's ladder: 9 cumulative rungs x 3 seeds (CIFAR-10, or the mirror here), then its report
	@echo "ladder data: $(DATA_ARGS)"
	@[ "$(LADDER_DEVICE)" = cpu ] || $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { \
	  echo "make ladder: torch sees no CUDA device here. The ladder is 27 runs x 40 epochs on 50,000 images: its"; \
	  echo "training steps alone took ~61 h on 2 CPU cores (measured). Run it on a GPU, or LADDER_DEVICE=cpu make"; \
	  echo "ladder to train here anyway."; exit 1; }
	$(BIN)/python -m cifar_ablation experiment=slide_ladder $(DATA_ARGS) device=$(LADDER_DEVICE) hydra/launcher=streams \
	    jobs_per_device=$(LADDER_RUNS) hydra.launcher.processes=$(LADDER_PROCS)
	$(BIN)/python -m cifar_ablation.report --experiment slide-ladder --out experiments/slide_ladder

gpu-prep:  ## before a GPU run: wheels (Hydra, MLflow, pytest, py-spy) into .whl/, the mirror into data/ (git-ignored)
	bash experiments/gpu_prep.sh $(MIRROR)

gpu-rehearse:  ## after gpu-prep: the GPU run's tiny mode as the GPU machine runs it (Python 3.12, torch 2.11, .whl)
	bash experiments/gpu_rehearse.sh $(or $(OUT),gpu_rehearsal)

gpu-run:  ## the prepared GPU run of issue #10 into OUT=gpu_out; STEPS=ladder,tests,bench,forms; TINY=--tiny on a CPU
	bash experiments/gpu_run.sh $(TINY) $(if $(STEPS),--steps $(STEPS)) $(or $(OUT),gpu_out)

gpu-publish: install  ## a GPU run's files (FROM=its OUT) into experiments/ as NAME=<card-date>, reports made again
	bash experiments/publish_gpu_run.sh $(FROM) $(NAME)

bench: install  ## textbook DataLoader loop vs the trainer, then K concurrent runs (CPU-sized; see --help)
	@echo "bench data: $(DATA)"
	$(BIN)/python -m cifar_ablation.bench --data $(DATA)

report: install  ## the table of the latest sweep in the default store and experiment
	$(BIN)/python -m cifar_ablation.report

ui: install  ## the MLflow UI over the default store, on 127.0.0.1 (PORT=5000); prints each experiment's address
	$(BIN)/python -m cifar_ablation.ui --port $(PORT)

screenshots: install services  ## pictures of the UI over the demo's sweep (EXPERIMENT=demo) into docs/
	$(BIN)/python -m cifar_ablation.ui --screenshots docs --experiment $(or $(EXPERIMENT),demo) --port 5077

clean:  ## remove outputs, multirun, reports (not the MLflow store)
	rm -rf outputs multirun reports .pytest_cache
