# Two commands: `make demo` runs the main job on the embedded default, `make test` runs the test suite.
# Both create the virtual environment on first use (CPU torch first, so no CUDA wheels are pulled).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra requirements installed with the project, e.g. PINS="transformers==5.24.0" (CI tests the lowest release too).
PINS ?=

.PHONY: demo test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[train,test]" $(PINS)
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
