# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.installed-test-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install install-test test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

# torch==2.13.0 first: it resolves to the local CPU build; any other spec pulls a CUDA build.
$(TEST_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

lint: $(TEST_STAMP)
	$(PY) -m ruff check .

# Two workers, one test file each at a time: most of the suite is XLA compiling, one core per program. Files go
# in the order tests/conftest.py gives them (longest first); xdist would otherwise sort them by their test count.
test: $(TEST_STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

demo: $(STAMP)
	$(VENV)/bin/gptoss run configs/inference/demo.yaml

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
