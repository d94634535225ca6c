# The two commands of the README, and the set-up they share.
#   make quickstart   set up .venv, train the quickstart LoRA on the toy base, write runs/quickstart/ab_grid.png
#   make test         set up .venv, run the test suite (the command CI runs)
#   make studio       set up .venv, start the studio (http://127.0.0.1:8501) with a training worker
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact tested versions of every package (made by .ci/lock; see README "Set-up"). Without a CUDA driver torch
# comes from it too (the CPU build torch==2.13.0: an unpinned `torch` pulls several GB of CUDA wheels); with one,
# every package but torch is held to the lock and pip picks the CUDA torch build for that driver.
LOCK   := requirements-lock.txt
CUDA   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH  := $(if $(CUDA),torch,torch==2.13.0)
PIP    := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: setup quickstart studio test test-slow test-gpu lint lock lock-add check-latest

setup: $(VENV)/.installed

# PYTHONWARNINGS: setuptools' note on every editable install ("be careful with folders named like your package") has
# nothing to say here; pyproject.toml's include-package-data = false keeps its package-discovery warnings away.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(if $(CUDA),grep -v '^torch==' $(LOCK),cat $(LOCK)) > $(VENV)/constraints.txt
	$(PIP) install -c $(VENV)/constraints.txt pip setuptools wheel
	$(PIP) install -c $(VENV)/constraints.txt "$(TORCH)"
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -c $(VENV)/constraints.txt --no-build-isolation -e ".[dev]"
	$(BIN)/python -m sdtune.studio.versions --check $(LOCK) $(if $(CUDA),--ignore torch)
	touch $@

quickstart: setup
	$(BIN)/accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		trainers/lora.py recipes/quickstart.yaml output.overwrite=true
	@echo "A/B grid: runs/quickstart/ab_grid.png   LoRA: runs/quickstart/toy-purple.safetensors"

studio: setup
	$(BIN)/sdtune studio --worker

test: setup
	$(BIN)/python -m pytest -q --durations=0 --durations-min=5

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

# Re-resolve pyproject.toml's ranges into requirements-lock.txt. Commit it only after `rm -rf .venv && make test` passes.
lock:
	.ci/lock $(PYTHON)

# After adding a dependency to pyproject.toml: keep every locked version, resolve only the new packages.
lock-add:
	.ci/lock --keep $(PYTHON)

# Not in CI: a throwaway venv from the newest versions the registry serves, the fast tests, and which package broke what.
check-latest:
	$(PYTHON) .ci/check_latest.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
