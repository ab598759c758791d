# `make demo` runs the main job on an embedded default; `make test` runs the whole test suite;
# `make figures` reruns the comparisons the README quotes and rewrites its figures (docs/figures/);
# `make llama-cpp` compiles llama.cpp into the venv (llama-cpp-python; several minutes)
# for tests/export/test_gguf_llama_cpp.py;
# `make bench` measures every benchmark ratio in one run and regenerates benchmarks/RESULTS.md (BENCH_ARGS=--quick: smoke test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/sentiment/lora.yaml

.PHONY: demo test test-fast lint install clean bench figures llama-cpp

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps -c constraints.txt -r requirements-assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-adapt fit --config $(RECIPE)

lint: $(STAMP)
	$(BIN)/ruff check lightning_adapt tests benchmarks
	$(BIN)/ruff format --check lightning_adapt tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not distributed and not cuda"

llama-cpp: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(BIN)/pip install 'llama-cpp-python>=0.3.30'

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

figures: $(STAMP)
	$(BIN)/python benchmarks/figures.py

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache .mypy_cache .ruff_cache
