# Every target runs from the repository root; .venv is built once by `make install`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install browser test test-fast test-gpu train bench bench-gpu tensorboard screenshot lint clean

# torch/torchvision are pinned to the releases this machine's pip serves from local disk.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev,timm,offline-weights,export,scale,loggers]"
	touch $@

install: $(VENV)/.installed

# The whole suite, real-data tests included. pytest's exit code 5 (nothing collected) fails too.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Synthetic-data tests only: seconds to a few minutes.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# End-to-end runs on a CUDA GPU (tests/test_gpu.py); each is skipped where there is none.
test-gpu: install
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

train: install
	$(VENV)/bin/tlexp-train $(ARGS)

# perf=naive vs perf=fast on ../shared/data/flower_photos -> docs/bench.md + docs/bench.json (long: see the file).
bench: install
	$(PY) scripts/bench.py $(ARGS)

# perf=naive vs perf=fast, experiment=seed_table_offline on one GPU -> docs/bench_gpu.md (+ .json).
bench-gpu: install
	$(PY) scripts/bench_gpu.py $(ARGS)

# localhost only; ARGS=--bind_all serves it to other machines too.
tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs $(ARGS)

# Headless Chromium from Debian, for the dashboard screenshot (and its test). Needs root or sudo.
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# make screenshot RUN=outputs/runs/<day>/<run> -> docs/tensorboard_scalars.png, docs/tensorboard_images.png
screenshot: install browser
	$(PY) scripts/tensorboard_screenshot.py $(RUN)/tensorboard docs/tensorboard

lint: install
	$(VENV)/bin/ruff check tlexp tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
