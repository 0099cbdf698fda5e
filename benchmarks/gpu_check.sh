#!/usr/bin/env bash
# The GPU check, sized for one H100/H200 in under 12 minutes (JAX CUDA build, flax, optax; the
# `gpu` extra's tokamax and qwix for their rows, which are skipped with the reason when missing; no
# network; nothing to install: every part runs as a module from the repository root).
# Prints bf16 train-step tokens/s and MFU of a ~0.9B dense trunk and its 8-expert top-2 version
# at seq 2048 with one-lever variants (tokamax grouped kernel, FP8 included), the attention
# kernels, the grouped matmul (Pallas, tokamax, FP8) against ragged_dot, the expert exchange
# (padded all_to_all against ragged_all_to_all), and the MoE dispatch paths' ratios to a dense
# layer of equal active FLOPs. `--smoke` runs the same code paths on a CPU in about a minute (the
# test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--smoke" ]; then
  "$PY" -m benchmarks.gpu_check --smoke
  "$PY" -m benchmarks.attention --smoke
  "$PY" -m benchmarks.grouped_matmul --smoke
  "$PY" -m benchmarks.gpu_check --exchange --smoke
  "$PY" -m benchmarks.moe_dispatch --config 512,8,2,64 --reps 2
else
  "$PY" -m benchmarks.gpu_check "$@"
  "$PY" -m benchmarks.attention
  "$PY" -m benchmarks.grouped_matmul
  "$PY" -m benchmarks.gpu_check --exchange
  "$PY" -m benchmarks.moe_dispatch --dtype bfloat16 --reps 10 --max-gflop 1e9 \
    --config 16384,8,2,1024 --config 16384,8,2,2048 --config 65536,8,2,1024 \
    --config 16384,64,8,1024 --config 16384,16,1,1024
fi
