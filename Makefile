# cifar-ablation. `make test` sets everything up from nothing, then runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/cifar10-jpeg.tar.gz
PORT   ?= 5000

.PHONY: install test test-slow ladder report ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# The multi-process launcher tests (8 parallel jobs, submitit): a few minutes on 2 cores.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The slide's ladder: 9 cumulative rungs x 3 seeds on the JPEG CIFAR-10 mirror, then its report.
ladder: install
	$(BIN)/python -m cifar_ablation experiment=slide_ladder data.path=$(DATA)
	$(BIN)/python -m cifar_ablation.report --experiment slide-ladder --out experiments/slide_ladder

# Textbook DataLoader loop vs the trainer, then K concurrent runs (CPU-sized defaults; see --help).
bench: install
	$(BIN)/python -m cifar_ablation.bench --data $(DATA)

report: install
	$(BIN)/python -m cifar_ablation.report

# The MLflow UI over the default store, on loopback only.
ui: install
	$(BIN)/python -m mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf outputs multirun reports .pytest_cache
