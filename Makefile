# Entry points for working on dealledger. `make help` lists them.

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

BIN := $(VENV)/bin
LOCAL := deploy/local
# The installs are redone only when pyproject.toml is newer than these.
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.DEFAULT_GOAL := help
.PHONY: help venv run test lint bench up down clean

help: ## list the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "  %-6s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

venv: $(TEST_STAMP) ## create the virtualenv and install the project with its test tools

$(TEST_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(BENCH_STAMP): $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

run: venv ## the main job on SQLite: progression API, metrics API, feed projector
	exec $(LOCAL)/run-embedded

lint: venv ## ruff check, ruff format --check and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv lint ## lint, then the tests against a throwaway PostgreSQL and Kafka
	$(LOCAL)/with-services --kafka -- $(BIN)/pytest -ra $(PYTEST_ARGS)

bench: $(BENCH_STAMP) ## the benchmarks, against a throwaway PostgreSQL and Kafka
	$(LOCAL)/with-services --kafka -- $(BIN)/python -m bench

up: ## start the local stack (PostgreSQL, Kafka) and print how to reach it
	$(LOCAL)/stack.sh up

down: ## stop the local stack
	$(LOCAL)/stack.sh down

clean: down ## stop the local stack, remove the virtualenv and .local
	rm -rf $(VENV) .local
