# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Installs into .venv through constraints.txt (the tested versions; torch==2.13.0 CPU build here).
# Elsewhere, point pip at a CPU torch wheel index to avoid ~2.6 GB of CUDA wheels:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradmm-installed
TORCH_INDEX ?=
PIP_INDEX_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-fast lint format bench quality lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_INDEX_FLAGS) -c constraints.txt -e '.[dev,cloud]'
	$(PY) -c "from gradmm_ray.models.smollm2 import ensure_smollm2; print(ensure_smollm2())"  # once: ~0.5 GB in the cache
	@touch $(STAMP)

demo: install
	$(PY) jobs/distill.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The pure core and everything that needs neither Ray nor a real model (~1-2 min on 2 cores).
test-fast: install lint
	$(PY) -m pytest -m "not ray and not slow" $(PYTEST_ARGS)

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) jobs/benchmark.py --json outputs/benchmark.json

# The quality benchmark (~35 min on 2 cores; needs ../shared/data/rt-snippets): quality.* in the same
# JSON, outputs/quality/results.md. `jobs/quality.py --grid full` runs the issue's whole grid.
quality: install
	$(PY) jobs/quality.py --json outputs/benchmark.json

# Re-resolve the tested set from pyproject's ranges (run after changing dependencies).
lock: install
	@grep '^#' constraints.txt > constraints.txt.new
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu//' | sort -f >> constraints.txt.new
	@mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
