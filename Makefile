# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo up test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,llama]'
	touch $@

demo: $(VENV)/.installed  ## start the stack, stream one job, stop
	$(VENV)/bin/inferq --log-level WARNING demo "def "

up: $(VENV)/.installed  ## run the stack until Ctrl-C
	$(VENV)/bin/inferq up

test: $(VENV)/.installed  ## install everything and run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .inferq .pytest_cache
