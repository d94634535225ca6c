#!/usr/bin/env bash
# On a lent GPU machine (run from the repository root, with .whl carried; see wheels.sh): installs the carried
# wheels into /tmp/site once per machine, and sdtune itself on every call (pip --target copies it: a fix made between
# two calls on the same warm machine must reach the next one), without network, beside the machine's own torch, and
# prints what the benchmarks will run on. Source it: `source bench/device/setup.sh && ...`, so that PYTHONPATH reaches
# the commands after it.
set -e
if [ ! -f /tmp/site/.wheels-ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  touch /tmp/site/.wheels-ready
fi
rm -rf /tmp/site/sdtune /tmp/site/sdtune-*.dist-info
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site/.sdtune-new .
cp -r /tmp/site/.sdtune-new/. /tmp/site/ && rm -rf /tmp/site/.sdtune-new
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.metadata as md
import torch
import sdtune.adapters.base  # noqa: F401  (the package and its imports resolve)
names = ["torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "bitsandbytes", "datasets"]
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| CUDA", torch.version.cuda)
else:
    print("device: no CUDA GPU (a rehearsal)")
PY
set +e
