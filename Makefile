# agent-session-cache — developer and CI entry points.  `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Where the services live; scripts/services.sh starts private ones when these do not answer.
export REDIS_URL    ?= redis://127.0.0.1:6379/0
export DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/agent_sessions

.PHONY: help setup services services-down services-status migrate lint typecheck format \
        test demo bench clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

setup: $(STAMP) ## Create .venv (python3.11) and install the project with the dev extra

# The venv itself (pip is the sentinel: a venv left half-made by a missing ensurepip has none).
# python3-venv is installed only when `python3.11 -m venv` fails.
$(BIN)/pip:
	@if ! $(PYTHON) -m venv $(VENV); then \
		echo "venv creation failed; installing python3-venv"; \
		rm -rf $(VENV); \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; \
		$(PYTHON) -m venv $(VENV); \
	fi
	@test -x $@

# Re-install only when pyproject.toml changed since the last successful install.
$(STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

services: ## Make sure Redis (REDIS_URL) and Postgres (DATABASE_URL) answer
	bash scripts/services.sh up

services-down: ## Stop the servers that `make services` started (never shared ones)
	bash scripts/services.sh down

services-status: ## Show what answers and what `make services` started
	bash scripts/services.sh status

migrate: setup services ## Apply the database migrations to DATABASE_URL
	$(BIN)/agent-sessions migrate

lint: setup ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup ## mypy (strict; packages listed in pyproject.toml)
	$(BIN)/mypy

format: setup ## Reformat and apply safe ruff fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest exits 5 when nothing was collected; like any non-zero status it fails the target.
test: setup services lint typecheck ## Everything CI runs: lint, typecheck and the test suite
	$(BIN)/python -m pytest

demo: setup services ## Run the end-to-end demo
	$(BIN)/agent-sessions demo

bench: setup services ## Run all benchmarks
	$(BIN)/python -m bench all

clean: ## Stop private services; remove .venv, .run and caches
	-bash scripts/services.sh purge
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
