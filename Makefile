# The two commands of the README quick start. Each creates .venv at the repository root
# and installs the project into it on first use (or when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/ssm2d.py --quick --json outputs/demo/benchmark_ssm2d.json
	$(PY) -m ssm2d kernels --init --output outputs/demo/kernels_init.png

test: $(STAMP)
	$(PY) -m pytest
