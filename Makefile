# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if needed and installs what it needs (PyPI's torch/torchvision: the local
# CPU-only torch wheel breaks torchvision, which timm, open_clip and lightly import).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := PIP_FIND_LINKS= $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test lint install gpu-check

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

# On a machine with one CUDA GPU (under 8 minutes, no network): the CUDA tests, bf16 steps of every
# loss under torch.cuda.set_sync_debug_mode("error"), benchmarks/large_batch.py and train_step.py;
# all into benchmarks/results/gpu_check_<device>.json and .md. Without CUDA it says so and fails.
gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
