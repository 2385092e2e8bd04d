# Two commands on a fresh machine:  `make study`  and  `make test`.
# Both create (or reuse) a virtual environment in .venv and install into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Override on machines where these exact builds are not available, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STUDY_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv study study-quick test lint docs clean

$(VENV)/.camkit-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test,examples,docs,dev]"
	touch $@

venv: $(VENV)/.camkit-installed

study: venv
	$(PY) examples/overfitting_study.py $(STUDY_ARGS)

study-quick: venv
	$(PY) examples/overfitting_study.py --quick $(STUDY_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check src tests examples benchmarks

docs: venv
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist docs/_build study-output
