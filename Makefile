# Two entry points for a fresh machine (see README): `make demo` and `make test`; `make test-fast`
# runs the quick tier of the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-fast smoke install-check clean

$(BIN)/brainpaint: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/brainpaint

# Inference with the shipped weights on the two shipped demo cases, then the official metrics.
demo: setup
	$(BIN)/brainpaint infer --data-path workspace/data --output-path workspace/predictions \
		--parameters-file workspace/parameters.yaml
	$(BIN)/brainpaint evaluate --predictions workspace/predictions --labels workspace/data \
		--output-file workspace/metrics/demo_metrics.csv --parameters-file workspace/parameters.yaml

test: setup
	$(BIN)/python -m pytest -q

# The quick tier: every test not marked slow (training runs, subprocesses, DDP, containers'
# calls, long inference) or docker; under a minute on 2 CPU cores. `make test` runs them all.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not docker"

# Real container: private dockerd, debootstrap base image, mlcube infer/evaluate (see the MLCube section of README.md).
smoke: setup
	bash scripts/container_smoke.sh

# A fresh virtual environment with `pip install .` and `pip install -e .`: the installed command works.
install-check:
	bash scripts/install_check.sh

clean:
	rm -rf workspace/predictions workspace/metrics
