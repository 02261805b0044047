# worldmodel: the commands a new user runs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := data/shards/sample

.PHONY: setup demo test test-fast lint bench clean

$(BIN)/worldmodel: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a CPU-only machine must never pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$$(grep '^torch==' requirements-lock.txt)"
	$(BIN)/pip install --quiet -c requirements-lock.txt -e ".[dev]"
	touch $(BIN)/worldmodel

setup: $(BIN)/worldmodel

demo: setup
	$(BIN)/worldmodel prepare sample --out $(SAMPLE)
	$(BIN)/worldmodel inspect $(SAMPLE) --batches 4 --batch-size 4 --workers 2

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check worldmodel tests benchmarks train.py

bench: setup
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) data/shards outputs multirun .pytest_cache
