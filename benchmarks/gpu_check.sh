#!/usr/bin/env bash
# Everything that needs a GPU, as one short script for a session that has the device machine (~10 min):
# CUDA parity tests, the scan benchmark (torch / triton / mamba_ssm), a LoG-VMamba training step per
# backend, and the hippocampus AMP steps. Writes its output under ${OUT:-/tmp/gpu_check}.
#   bash benchmarks/gpu_check.sh            (from the repository root, after the README's install)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
$py -m nnunet_logmamba doctor > "$out/doctor.txt" 2>&1
# parity on the device: every test marked cuda (Triton vs torch, AMP steps, batched blocks)
timeout 240 $py -m pytest -p no:cacheprovider -q -m cuda tests > "$out/cuda_tests.txt" 2>&1
timeout 240 $py benchmarks/bench_scan.py --device cuda --lengths 4096 16384 32768 --long 65536 --repeats 5 \
    > "$out/bench_scan_cuda.txt" 2>&1
# one training step of the planned hippocampus networks per backend (needs the plans of eval_hippocampus.py)
if [ -f /tmp/nnunet_logmamba_hippocampus/nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans.json ]; then
  for backend in torch triton mamba_ssm; do
    BIOIMAGE_MAMBA_SCAN_BACKEND=$backend timeout 120 $py benchmarks/bench_network.py --device cuda --steps 5 \
        --json "$out/bench_network_cuda_$backend.json" > "$out/bench_network_cuda_$backend.txt" 2>&1
  done
fi
tail -n 3 "$out"/*.txt
