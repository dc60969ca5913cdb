# make train  - set everything up (first time) and run the main job on the built-in default
# make test   - the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The pair tested on the CPU (pip takes both from this machine's disk); never let pip resolve an unpinned torch.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test test-slow clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet $(TORCH_PIN) -e '.[dev]'
	touch $@

train: setup
	$(PY) src/train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

clean:
	rm -rf .cache logs outputs .pytest_cache
