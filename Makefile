# Two entry points: `make run` (the main job on the embedded default) and `make test` (the test suite).
# Each creates .venv on first use. The venv sees system site-packages so that a torch already installed
# (e.g. a CUDA build on a GPU host) is kept; where none is importable, the CPU build 2.13.0 is installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

PYDOC ?= /usr/share/doc/python3.11/html/_sources

.PHONY: run test clean corpus

$(BIN)/python:
	$(PY) -m venv --system-site-packages $(VENV)

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/moeflow generate $(ARGS)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q $(ARGS)

# The demo model's training corpus (the Python docs' reStructuredText sources, Debian package python3.11-doc),
# copied into the git-ignored .carry/ so that it can travel to a GPU host that has neither the package nor a network.
corpus: .carry/pydoc

.carry/pydoc:
	@test -d $(PYDOC) || { echo "no $(PYDOC): apt-get install python3.11-doc, or make corpus PYDOC=DIR"; exit 1; }
	mkdir -p $@.tmp && cp -r $(PYDOC)/. $@.tmp/ && mv $@.tmp $@

clean:
	rm -rf $(VENV) src/*.egg-info
