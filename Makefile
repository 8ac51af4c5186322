# Quick start:  make demo   (end-to-end main job)      make test   (the test suite; .ci/run calls it)
# Both create .venv and install the package first. Override TORCH_SPEC for another torch build, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-all demo demo-quick bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,zst,demo]"
	-$(PY) tools/install_punkt.py
	touch $@

test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	PYTHON=$(PY) bash scripts/demo.sh

demo-quick: install
	PYTHON=$(PY) bash scripts/demo.sh --quick

clean:
	rm -rf $(VENV) demo_out .pytest_cache
