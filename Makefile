# The two commands a new user runs (see README.md):
#   make demo   -> creates .venv, installs maskmix, runs the end-to-end demo on embedded defaults
#   make test   -> creates .venv, installs maskmix with dev extras, runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch goes in first and pinned: a bare "torch" resolved by pip would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# DeepSpeed JIT-compiles a communication op on first use; keep the build cache with the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
PYTEST_ARGS ?=
# Two pytest workers, each taking whole test files (module fixtures start Ray, MLflow or a stack
# once per file). Serially the suite leaves the cores idle 30% of the time (process start-ups);
# with two workers they are busy 93%, but the work grows by contention, so the gain is modest
# (2 cores, clean clones: pytest 25-27 min serial, 23.5-26 min this way; the load test is the
# long pole). Files go out longest first (tests/conftest.py LONG_POLES; --no-loadscope-reorder
# keeps that order), and each worker's torch gets its share of the cores (conftest.py).
# PYTEST_WORKERS=0 runs it serially.
PYTEST_WORKERS ?= 2

.PHONY: demo test install install-dev browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/maskmix demo

# The dashboard's browser test (tests/test_dashboard_browser.py) drives Debian's chromium through
# chromedriver; install both when missing (CI runs as root on a fresh Debian machine).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; \
	  else echo "chromium/chromedriver missing and not root (no sudo): install chromium chromium-driver" >&2; exit 1; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

test: $(VENV)/.installed-dev browser
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache demo-out mlflow.db mlruns
