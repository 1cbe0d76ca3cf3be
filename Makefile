# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export FGTRAC_HOME  ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(FGTRAC_HOME)/dagster

.PHONY: install run test ui verify bench clean-data

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

## run: install, materialise both pipelines into $FGTRAC_HOME, print a summary and verify
run: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dg launch --job digits_cnn_job -m fgtrac_assets.definitions
	$(BIN)/dg launch --job multimodal_graph_job -m fgtrac_assets.definitions
	$(BIN)/fgtrac summary

## test: install, add the Debian packages some tests use where it can (tests/system_packages.sh), run the suite
test: install
	@sh tests/system_packages.sh
	$(BIN)/python -m pytest

## ui: the Dagster UI on http://127.0.0.1:3000
ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1

## bench: every benchmark, side by side with the peers; writes benchmarks/RESULTS.md
bench: install
	$(BIN)/python benchmarks/run.py

verify: install
	$(BIN)/fgtrac verify

## clean-data: forget everything under ./data (the ledger, keys and artifacts)
clean-data:
	-[ -x $(BIN)/fgtrac ] && $(BIN)/fgtrac key forget
	rm -rf data/ledger.duckdb data/ledger.duckdb.wal data/ledger.lock data/artifacts data/keys data/witness data/dagster
