# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs; re-running skips the install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint clean

# Where torch comes from. On Linux, PyPI's torch==2.13.0 is the CUDA build: with its nvidia-* wheels,
# gigabytes. A machine without an NVIDIA GPU gets the CPU-only build (a few hundred MB) from PyTorch's
# own index: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`. Empty (the default): pip's
# configured indexes, which is all a machine that reaches only those (a mirror, PyPI) can use.
TORCH_INDEX ?=

# The main job needs only the runtime dependencies; the tests add transformers (the reference
# implementation), the browser-test and fuzzing tools, and TensorFlow (OpenAI's original format).
$(RUN_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, from TORCH_INDEX when given: `pip install -e .` below then keeps it.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,tf]'
	touch $(TEST_STAMP)

# `make demo PORT=8001`: serve on another port (8000 is the default).
demo: $(RUN_STAMP)
	$(BIN)/glassgpt demo $(if $(PORT),--port $(PORT))

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
