# make run   - set up .venv if needed, then start lora-studio on the built-in model
# make test  - set up .venv if needed, then run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,prodigy]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lora-studio ui --preload sample_images

# two pytest-xdist workers, each test module whole on one (its module fixtures built once); tests/conftest.py
# shares the cores between them
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadscope

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
