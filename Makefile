# Two commands do all set-up on a fresh machine that has only Python:
#   make demo   - create .venv, install jaxdeq, train a DEQ on scikit-learn's digits
#   make test   - create the same environment and run the whole suite
#   make docs   - build the documentation site into site/ (mkdocs, --strict)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: venv demo test test-slow lint format bench bench-tiny docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/digits.py --out outputs/demo

test: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests

test-slow: venv
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m slow tests

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: venv
	bash benchmarks/envs.sh
	$(BIN)/python benchmarks/bench_loop.py
	$(BIN)/python benchmarks/run_all.py

bench-tiny: venv
	$(BIN)/python benchmarks/run_all.py --tiny

# The docs tools go into the same .venv (mkdocstrings reads the docstrings from src/);
# the tutorials are rendered from the committed notebooks, never executed.
DOCS_STAMP := $(VENV)/.docs-stamp

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache outputs site
