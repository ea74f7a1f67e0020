# The two commands of the README quick start. Each creates .venv at the repository root and
# installs the project into it on first use (or when pyproject.toml changes), and installs
# Debian's Fashion-MNIST package where apt is available.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_MODELS := vit_mini_28,vit_mini_28_ssm2d,vit_mini_28_nope,vit_mini_28_ssm2d_nope
export HF_HUB_OFFLINE := 1

.PHONY: demo study test data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST, the embedded default data set (Debian's dataset-fashion-mnist, 30 MB). Without
# apt (or root/sudo) this only warns: the demo then needs --data-dir, and its tests skip.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    ($$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "warning: could not install dataset-fashion-mnist with apt-get"; \
	  else \
	    echo "warning: no apt-get: put the Fashion-MNIST IDX files in a folder and pass --data-dir"; \
	  fi; \
	fi

# The main job: the tiny ViT with and without the 2-D SSM, each with and without a position
# embedding, trained on Fashion-MNIST with one recipe; then the learned kernels as heat maps.
demo: $(STAMP) data
	$(PY) -m ssm2d compare configs/demo_cpu.yaml --models $(DEMO_MODELS) --output outputs/demo
	$(PY) -m ssm2d kernels --checkpoint outputs/demo/vit_mini_28_ssm2d/seed0/best.pt
	$(PY) -m ssm2d kernels --checkpoint outputs/demo/vit_mini_28_ssm2d_nope/seed0/best.pt

# The study of docs/results.md (configs/study.yaml, about 4 hours on 2 CPU cores): resumable, so
# run it again after a kill; it takes over the finished runs of a committed docs/results.json.
# It rewrites docs/results.md, docs/results.json, docs/img/ and README's study-results block. At the
# end it times the training step of every arm not timed yet (the report's fair s / epoch column);
# `make study STUDY_FLAGS=--timing` times them all again and trains nothing.
study: $(STAMP) data
	$(PY) -m ssm2d study configs/study.yaml --output outputs/study $(if $(wildcard docs/results.json),--resume-from docs/results.json) $(STUDY_FLAGS)

test: $(STAMP) data
	$(PY) -m pytest
