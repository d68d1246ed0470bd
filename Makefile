# Every pip install here goes through constraints.txt, which pins the CPU build of torch.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench dist clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lazyserve demo

lint: $(STAMP)
	$(BIN)/ruff check src handler tests benchmarks examples
	$(BIN)/ruff format --check src handler tests benchmarks examples
	$(BIN)/mypy src handler examples
	$(BIN)/cfn-lint template.yaml
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: $(STAMP)
	$(BIN)/ruff check --fix src handler tests benchmarks examples
	$(BIN)/ruff format src handler tests benchmarks examples

# Two workers (this kind of machine has two cores); the slow tests (a fresh venv for `lazyserve
# init`, the Lambda image) are scheduled first so they overlap the rest. Three workers took
# 329-356 s against 369-379 s here, but starved the timing-sensitive tests: one run in four lost
# a connection in test_load's cold-start run.
test: lint
	$(BIN)/python -m pytest -n 2 --dist worksteal $(PYTEST_ARGS)

# The peers (boto3's CRT, Run:ai Model Streamer, s3torchconnector) come with the `bench` extra;
# uvicorn_load installs wrk itself when it is missing.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run

# The sdist, and the wheel built from it (as pip builds one from the sdist), both checked.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
