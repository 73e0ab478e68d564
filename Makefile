# The two set-up commands: `make demo` runs the demo, `make test` runs the tests.
# Each creates .venv if missing and installs the pinned dependencies itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EXT    := $(VENV)/.ext-built
CPP    := $(shell find cpp -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: demo demo-llm eval test pytest ctest bench venv clean headers

venv: $(EXT)

$(DEPS): requirements.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# The extension compiles against the installed torch, hence --no-build-isolation.
$(EXT): $(DEPS) $(CPP) cpp/sources.txt setup.py pyproject.toml
	@echo "building the loldu extension (C++, against the installed torch): a few minutes on 2 cores, quietly"
	MAX_JOBS=2 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The demo: LoLDU against a head-only baseline on AFINN-165 word sentiment, then save, merge, ONNX.
demo: $(EXT)
	$(BIN)/python examples/demo.py

# The causal-LM demo: SmolLM2-135M-Instruct (4-bit GGUF, converted once) instruction-tuned with LoLDU at
# full rank on AFINN-165 words, zero-shot against fine-tuned accuracy by greedy generation; save, reload, merge.
demo-llm: $(EXT)
	$(BIN)/python examples/demo_llm.py

# LoLDU against PEFT LoRA, IA3, VeRA, RoAd, full fine-tuning and head-only on the demo's task
# (docs/evaluation.md); PEFT and matplotlib are evaluation-only dependencies.
eval: $(EXT)
	$(BIN)/python -m pip install -q peft==0.21.2 matplotlib==3.11.2
	$(BIN)/python benchmarks/eval_peft.py --workers 3

# Both suites run even when the first fails; the target fails if either did.
test: $(EXT)
	status=0; $(MAKE) --no-print-directory pytest || status=1; $(MAKE) --no-print-directory ctest || status=1; exit $$status

pytest: $(EXT)
	$(BIN)/python -m pytest tests

# The C++ library and its unit tests, built with CMake against torch's own CMake package.
ctest: $(DEPS)
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

# PEFT is a benchmark-only dependency (the LoRA column of bench_adapter.py).
bench: $(EXT)
	$(BIN)/python -m pip install -q peft==0.21.2
	$(BIN)/python benchmarks/bench_ldu.py
	$(BIN)/python benchmarks/bench_adapter.py
	$(BIN)/python benchmarks/bench_export.py

# The C++ headers generated from python/loldu/ (op schemas, the form cost model, the adapter spec), after editing those.
headers:
	$(PYTHON) cpp/tools/gen_headers.py
	$(PYTHON) cpp/tools/gen_spec_header.py

clean:
	rm -rf build python/loldu/_C*.so
