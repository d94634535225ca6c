#!/usr/bin/env bash
# Copies diffusers' training examples that the benchmarks compare with into bench/.work/examples/ (git-ignored; they
# are never committed), at the commit every CPU figure in bench/RESULTS.md used, from a local diffusers git directory
# (a clone, or the search tool's `fetch github:huggingface/diffusers`, which gives /work/.mirror/huggingface+diffusers/repo).
#   bash bench/device/examples.sh /path/to/diffusers/.git-or-bare-repo
# A device call then carries bench/.work/examples (about 0.2 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=${1:?usage: bench/device/examples.sh DIFFUSERS_GIT_DIR}
COMMIT=58eb52c080  # their check_min_version is 0.40.0.dev0: they run on the lock's diffusers 0.42.1
mkdir -p bench/.work/examples
for path in examples/text_to_image/train_text_to_image_lora.py examples/dreambooth/train_dreambooth.py \
  examples/dreambooth/train_dreambooth_lora.py examples/controlnet/train_controlnet.py \
  examples/research_projects/diffusion_dpo/train_diffusion_dpo.py; do
  git --git-dir "$REPO" show "$COMMIT:$path" > "bench/.work/examples/$(basename "$path")"
done
ls -la bench/.work/examples
