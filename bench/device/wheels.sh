#!/usr/bin/env bash
# Downloads, here (where pip reaches the package index), the wheels a lent GPU machine lacks, into .whl/ (git-ignored),
# at the versions of requirements-lock.txt, for its Python 3.12. That machine has torch, transformers, accelerate,
# safetensors, huggingface_hub 1.x, opencv and pytest already (/work/.library/device/KINDS.md) and no network; it has
# no diffusers, datasets, pydantic or bitsandbytes. Its own transformers and huggingface_hub are kept: transformers
# checks the hub's version on import, and the GPU runs do not publish.
#
# Then every `run` call names .whl in `carry` and starts with `bash bench/device/setup.sh &&` (see that file).
# The wheels come to ~55 MB, under the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOCK=requirements-lock.txt
PACKAGES=(diffusers datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection peft bitsandbytes)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" "$LOCK") || { echo "wheels.sh: $name is not in $LOCK" >&2; exit 1; }
  pins+=("$pin")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .whl
