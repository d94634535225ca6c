# The two commands of the README, and the set-up they share.
#   make quickstart   set up .venv, train the quickstart LoRA on the toy base, write runs/quickstart/ab_grid.png
#   make test         set up .venv, run the test suite (the command CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without a CUDA driver, pin the CPU build of torch: an unpinned `torch` pulls several GB of CUDA wheels.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup quickstart test test-slow lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		trainers/lora.py recipes/quickstart.yaml
	@echo "A/B grid: runs/quickstart/ab_grid.png   LoRA: runs/quickstart/toy-purple.safetensors"

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
