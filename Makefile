# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo up test browser screenshot bench demo-model clean

# The demo needs only the base install: the demo model runs on ctransformers (a base
# dependency, prebuilt wheels), so a newcomer waits for wheels, not for llama-cpp-python's
# source build, playwright or schemathesis. The tests need everything.
$(VENV)/.installed-base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# llama-cpp-python compiles llama.cpp from source. The worker loads libllama and ggml only: its
# multimodal library (mtmd) is left out, and a CMAKE_ARGS of your own (-DGGML_CUDA=on) still applies.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
$(VENV)/.installed: $(VENV)/.installed-base
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install --quiet -e '.[dev,llama]'
	touch $@

demo: $(VENV)/.installed-base  ## start the stack, stream one job, stop
	$(VENV)/bin/inferq --log-level WARNING demo "def "

up: $(VENV)/.installed-base  ## run the stack until Ctrl-C
	$(VENV)/bin/inferq up

browser:  ## Debian's Chromium for the browser tests (they are skipped without it)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the browser tests will be skipped"

# Three processes on two cores: most tests wait on processes and sockets, not the CPU (measured on 2 cores:
# 4.6-5.3 min with 3, 5.8 with 2 handed out by file, 5.9 with 4, 10.5 in one). Each process starts its own
# Redis and workers.
PYTEST_WORKERS ?= 3
test: $(VENV)/.installed browser  ## install everything and run the test suite
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist load $(PYTEST_ARGS)

screenshot: $(VENV)/.installed browser  ## remake docs/screenshot.png: the page while the demo model streams
	$(PY) docs/screenshot.py

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,llama,bench]'
	touch $@

bench: $(VENV)/.bench-installed  ## the benchmarks, then their plots (each also runs alone: python -m bench.<name>)
	$(PY) -m bench.overhead --model tiny
	$(PY) -m bench.overhead --model small --runs 5 --max-tokens 64
	$(PY) -m bench.backends --model small
	$(PY) -m bench.batching --model small
	$(PY) -m bench.enqueue
	$(PY) -m bench.scaleout
	$(PY) -m bench.fanout
	$(PY) -m bench.soak --jobs 2000
	$(PY) -m bench.peer --model small
	$(PY) -m bench.report

TRAIN_VENV ?= .train-venv
demo-model:  ## retrain models/demo.gguf from this Python's stdlib (~25 min on 2 cores)
	$(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/pip install --quiet -e '.[train]'
	$(TRAIN_VENV)/bin/python models/train_demo.py --seed 0

clean:
	rm -rf $(VENV) .inferq .pytest_cache
