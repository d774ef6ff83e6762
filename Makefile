# `make run`: install into .venv and train the quickstart (shapes, tiny U-Net, CPU-friendly), then sample it.
# `make test`: install and run the test suite without the slow statistical checks (the slowest 25 tests printed at
# the end); it stays under 10 minutes on two cores, install included. `make test-all`: every test, the slow ones too.
# `make test-fast`: without the slow checks and without child processes.
# `make lint`: ruff's formatting and lint rules (pyproject.toml). `make docs`: the site, built strictly, offline.
# torch is pinned and installed first: an unpinned torch requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-all test-fast lint docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/diffuse train experiment=quickstart hydra.run.dir=outputs/quickstart
	$(VENV)/bin/diffuse sample ckpt=outputs/quickstart n=64 steps=50 sampler=ddim seed=0 hydra.run.dir=outputs/quickstart/sample

test: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow" --durations=25

test-all: $(STAMP)
	$(PY) -m pytest -q tests --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow and not subprocess" --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff format --check diffuse tests bench conf docs
	$(VENV)/bin/ruff check diffuse tests bench conf docs

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) outputs build *.egg-info
