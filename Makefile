# The one task runner. `make run` and `make test` install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# `make run MODEL=tiny` runs on a tiny generated model (offline); MODEL=/path/to/x.gguf on a local file;
# empty: the default Qwen GGUF, downloaded on first use.
MODEL  ?=
# `make run DEMO=0` starts without loading the demo knowledge base.
DEMO   ?= 1
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-m 'not browser' -x"`.
PYTEST_ARGS ?=

.PHONY: install system-deps run test lint typecheck bench-cpu bench-ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cpu,rag,dev]"
	touch $(STAMP)

install: $(STAMP)

# Chromium and CJK fonts for the browser tests (Debian packages; never a downloaded browser build);
# prometheus for promtool and a real Prometheus in tests/infra (its service is not left running).
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "noto sans cjk" \
		|| ! command -v promtool >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-noto-cjk prometheus >/dev/null; \
		($(SUDO) service prometheus stop >/dev/null 2>&1 || true); \
	fi

run: install
	$(BIN)/qwen-stack up $(if $(MODEL),--model $(MODEL),) $(if $(filter 1,$(DEMO)),--demo,)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check backend chat_ui

typecheck: install
	$(BIN)/mypy

test: install system-deps lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench-cpu: install
	$(BIN)/python bench/cpu_engine.py

bench-ui: install system-deps
	$(BIN)/python bench/ui_ttft.py

clean:
	rm -rf $(VENV) .qwen-stack .mypy_cache .ruff_cache .pytest_cache
