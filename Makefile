PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test test-all lint demo

# torch first, pinned, so the CPU wheel is used and no CUDA packages are pulled in.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m ""

# lint-imports (the layer contracts in pyproject.toml) runs through $(PYTHON), whose scripts need not be on
# PATH; --no-cache leaves no cache folder in the tree.
lint: install
	$(PYTHON) -m ruff check src tests benchmarks examples
	$(PYTHON) -m ruff format --check src tests benchmarks examples
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache

demo: install
	$(PYTHON) -m evl demo
