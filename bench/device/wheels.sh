#!/usr/bin/env bash
# Downloads, here (where pip reaches the package index), the wheels a lent GPU machine lacks, into .whl/ (git-ignored),
# at the versions of requirements-lock.txt, for its Python 3.12. That machine has torch (2.11, CUDA 13.0),
# accelerate, safetensors, huggingface_hub 1.x, tokenizers, opencv, matplotlib and pytest already
# (/work/.library/device/KINDS.md) and no network; it has no diffusers, datasets, pydantic or bitsandbytes, and an
# older transformers (5.17). Everything sdtune imports besides torch then runs at the lock's versions; the machine's
# huggingface_hub 1.x is kept (the lock's 2.x needs httpx2 and more; transformers, diffusers and datasets accept 1.x,
# and the GPU runs do not publish). The lock's fsspec comes too: datasets 5.2 wants fsspec <= 2026.9.0.
#
# Every `run` call then names .whl in `carry` and starts with `source bench/device/setup.sh &&` (see that file).
# A call carries at most 64 MiB with the working tree (~22 MB): bitsandbytes' wheel (43 MB) holds one library per
# CUDA/ROCm version, so only the CPU and CUDA 13.x ones are kept. The wheels come to ~31 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOCK=requirements-lock.txt
PACKAGES=(diffusers datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection typing_extensions
  peft bitsandbytes transformers fsspec)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" "$LOCK") || { echo "wheels.sh: $name is not in $LOCK" >&2; exit 1; }
  pins+=("$pin")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)
python3 - <<'PY'
# bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so: keep the CPU and CUDA 13.x libraries only, and
# their RECORD lines (pip installs what RECORD lists).
import re
import zipfile
from pathlib import Path

wheel = next(Path(".whl").glob("bitsandbytes-*.whl"))
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13)\w+\.so")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.fullmatch(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not drop.fullmatch(line.split(",")[0])).encode()
        dst.writestr(item, data)
slim.replace(wheel)
PY
du -sh .whl
