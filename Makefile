# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if needed and installs what it needs (PyPI's torch/torchvision: the local
# CPU-only torch wheel breaks torchvision, which timm, open_clip and lightly import).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := PIP_FIND_LINKS= $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test lint install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) -e ".[all]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/mnist_demo.py $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check glofnd_losses
	$(VENV)/bin/mypy
