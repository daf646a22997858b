#!/usr/bin/env bash
# GPU mode of the benchmarks: both scripts on the CUDA device, one JSON each into an output folder
# (tables on stdout).
#
#   benchmarks/gpu.sh [OUT_DIR]          (default: $OUT when set, else benchmarks/results, git-ignored)
#
# Sized for a short GPU lease: about 2-4 minutes on an H100/H200 class GPU, most of it the fresh
# Triton/Inductor compiles of the torch.compile baseline (backward_noise only on CUDA by default).
# Extra arguments for the scripts: STEP_ARGS="..." and TRAIN_ARGS="..." in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
python -c "import torch, diffflow_ext; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), diffflow_ext.available_backends())"
# shellcheck disable=SC2086
python benchmarks/step_throughput.py --device cuda --json "$out/step_throughput.json" ${STEP_ARGS:-}
# shellcheck disable=SC2086
python benchmarks/train_step.py --device cuda --json "$out/train_step.json" ${TRAIN_ARGS:-}
