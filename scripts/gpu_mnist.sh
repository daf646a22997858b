#!/usr/bin/env bash
# Train DiffFlow on MNIST for a few minutes on a GPU and record it/s, peak memory, the training step with
# the fused step ops against the reference ops (interleaved), and the test bits/dim reached, into
# $OUT/gpu_mnist.json (+ gpu_mnist.log, a sample grid PNG). Called by scripts/gpu_check.sh; runs alone too:
#
#   OUT=results bash scripts/gpu_mnist.sh                         # CUDA, paper network, 3 minutes, bf16
#   bash scripts/gpu_mnist.sh --device cpu --minutes 0.2 --config mnist-unet-small --batch 8 --final-n 50 \
#        --reps 2 --precision fp32                                 # plumbing check without a GPU
#
# Options: --device (cuda), --minutes of training (3; wall clock on CUDA), --config (mnist-paper: the
# paper's half-DDPM-width UNet, N=30, Adam 2e-4, EMA 0.999, clip 1; see benchmarks/images_cpu.py),
# --precision bf16|fp16|fp32 (bf16; the networks only, the states stay float32), --batch, --num-steps,
# --final-n test images in the final figure (2000), --reps of the fused-vs-reference comparison (10),
# --data-dir (default: $MNIST_DIR, then shared/data/mnist, ../shared/data/mnist).
# The goal of a *full* MNIST run is <= 1.0 bits/dim (paper 0.93, probability-flow ODE); a few minutes will not reach
# it. The final figure is given twice: the negative ELBO and the ODE likelihood (Hutchinson, dopri5 at 1e-4). Only the
# ODE figure can approach 1: the ELBO's first backward step is a Gaussian of std g sqrt(dt_0) (0.036 at N=30) against
# 256-level bins of width 2/256, which costs ~3.5 bits on each of the 81% of MNIST pixels that are exactly 0, so the
# -ELBO stays above ~2.8 bits/dim whatever the networks learn (docs/images.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-gpu_results}"
PY="${PYTHON:-python}"
DEVICE=cuda; MINUTES=3; CONFIG=mnist-paper; PRECISION=bf16; FINAL_N=2000; REPS=10; BATCH=""; STEPS=""
DATA_DIR="${MNIST_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --minutes) MINUTES="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --precision) PRECISION="$2"; shift 2 ;;
        --final-n) FINAL_N="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --batch) BATCH="$2"; shift 2 ;;
        --num-steps) STEPS="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_mnist.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$DATA_DIR" ]; then
    for d in shared/data/mnist ../shared/data/mnist; do
        if [ -e "$d/train-images-idx3-ubyte.gz" ] || [ -e "$d/train-images-idx3-ubyte" ]; then DATA_DIR="$d"; break; fi
    done
fi
if [ -z "$DATA_DIR" ]; then
    echo "gpu_mnist.sh: no MNIST IDX files found; pass --data-dir DIR or set MNIST_DIR" >&2
    exit 2
fi
mkdir -p "$OUT"
EXTRA=()
[ -n "$BATCH" ] && EXTRA+=(--batch "$BATCH")
[ -n "$STEPS" ] && EXTRA+=(--num-steps "$STEPS")
echo "[gpu_mnist] device=$DEVICE minutes=$MINUTES config=$CONFIG precision=$PRECISION data=$DATA_DIR out=$OUT"
"$PY" benchmarks/images_cpu.py mnist --data-dir "$DATA_DIR" --device "$DEVICE" --configs "$CONFIG" \
    --budget "$MINUTES" --precision "$PRECISION" --compare-backends --compare-reps "$REPS" \
    --eval-every 60 --eval-n 1000 --curve-split test --split test --final-n "$FINAL_N" --draws 1 --ode --ode-tol 1e-4 \
    --threads "${GPU_MNIST_THREADS:-4}" --grid-dir "$OUT" --json "$OUT/gpu_mnist.json" "${EXTRA[@]}" \
    2>&1 | tee "$OUT/gpu_mnist.log"
exit "${PIPESTATUS[0]}"
