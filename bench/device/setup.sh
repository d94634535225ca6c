#!/usr/bin/env bash
# On a lent GPU machine (run from the repository root, with .whl carried; see wheels.sh): installs the carried
# wheels and sdtune itself into /tmp/site, without network, beside the machine's own torch, and prints what the
# benchmarks will run on. Source it, or start each command with `source bench/device/setup.sh &&`, so that
# PYTHONPATH reaches the commands after it.
set -e
if [ ! -f /tmp/site/.sdtune-ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
  touch /tmp/site/.sdtune-ready
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.metadata as md
import torch
import sdtune.adapters.base  # noqa: F401  (the package and its imports resolve)
names = ["torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "bitsandbytes", "datasets"]
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
print("device:", torch.cuda.get_device_name(0), "| driver CUDA", torch.version.cuda)
PY
set +e
