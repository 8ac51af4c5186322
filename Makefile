# Quick start:  make demo   (the pipeline end to end, on CPU)      make test   (the test suite; .ci/run calls it)
# Both create .venv and install the package first. Override TORCH_SPEC for another torch build, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install lint test test-all demo demo-quick bench clean compat-install test-compat gpu-wheels gpu-proof-dry-run

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,zst,demo]"
	-$(PY) tools/install_punkt.py
	touch $@

test: install lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# the linter (pyflakes + pycodestyle, settings in pyproject.toml) gates the tests
lint: install
	$(VENV)/bin/ruff check .

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	PYTHON=$(PY) bash scripts/demo.sh

demo-quick: install
	PYTHON=$(PY) bash scripts/demo.sh --quick

# --- Compatibility lane: Python 3.12, the newest torch pip resolves, the newest megatron-core (README) ---
COMPAT_VENV  ?= .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
# python3.12 on PATH if it runs (a pyenv shim may not), else the newest ~/.pyenv/versions/3.12.*
PYTHON312    ?= $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1); do \
                  $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v $$p; break; }; done)
COMPAT_SPEC  ?= torch megatron-core
COMPAT_PIP_FLAGS ?= -q --progress-bar off
COMPAT_TESTS ?= tests/unit tests/dist/test_parity.py tests/dist/test_train_dist.py tests/dist/test_prune_dist.py

compat-install: $(COMPAT_VENV)/.installed

# Our package first, then COMPAT_SPEC upgraded to the newest releases even past our pin (pip then prints the
# conflict): the lane shows when the megatron-core bound in pyproject.toml can move.
$(COMPAT_VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 (not on PATH, not in ~/.pyenv/versions/3.12*): set PYTHON312=/path/to/python3.12" >&2; exit 2; }
	test -x $(COMPAT_PY) || $(PYTHON312) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install $(COMPAT_PIP_FLAGS) --upgrade pip
	$(COMPAT_PY) -m pip install $(COMPAT_PIP_FLAGS) -e ".[test,zst,demo]"
	$(COMPAT_PY) -m pip install $(COMPAT_PIP_FLAGS) --upgrade $(COMPAT_SPEC)
	-$(COMPAT_PY) tools/install_punkt.py
	$(COMPAT_PY) -m pip list 2>/dev/null | grep -iE '^(torch|megatron-core|transformers) '
	touch $@

test-compat: compat-install
	$(COMPAT_PY) -m pytest -m "not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

# --- GPU proof kit (README): wheels a bare Python 3.12 GPU machine lacks, then one command there ---
GPU_WHEELS ?= benchmarks/gpu_wheels

gpu-wheels: install
	$(PY) benchmarks/gpu_proof.py gather-wheels --dest $(GPU_WHEELS)

gpu-proof-dry-run: install
	PYTHON=$(PY) WHEELS=$(GPU_WHEELS) bash benchmarks/gpu_proof.sh --dry-run

clean:
	rm -rf $(VENV) $(COMPAT_VENV) demo_out .pytest_cache
