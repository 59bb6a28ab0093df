#!/usr/bin/env bash
# Everything that needs a GPU, as one short script for a machine with one (~8 min): CUDA parity tests, the
# scan benchmark (torch / triton with a tile sweep / mamba_ssm when installed), a LoG-VMamba training
# step per backend with AMP, and the hippocampus 1000-step pairs on the GPU with AMP. Writes under
# ${OUT:-/tmp/gpu_check}.   bash benchmarks/gpu_check.sh   (from the repository root, after the README's install;
# the hippocampus parts need the plans of `python benchmarks/eval_hippocampus.py --prepare-only`)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
work=${HIPPOCAMPUS_WORK:-/tmp/nnunet_logmamba_hippocampus}
pre=$work/nnUNet_preprocessed/Dataset004_Hippocampus
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
$py -m nnunet_logmamba doctor > "$out/doctor.txt" 2>&1
# parity on the device: every test marked cuda (Triton vs torch, AMP steps, batched blocks)
timeout 240 $py -m pytest -p no:cacheprovider -q -m cuda tests > "$out/cuda_tests.txt" 2>&1
# (the reference loop takes seconds per repeat on a GPU: left out)
timeout 240 $py benchmarks/bench_scan.py --device cuda --lengths 4096 16384 --long 65536 --repeats 10 \
    --backends torch triton mamba_ssm \
    --triton-tiles 64x4096x16 32x2048x8 32x1024x4 seq128x2048x16 seq64x1024x8 seq256x4096 \
    > "$out/bench_scan_cuda.txt" 2>&1
# where a step's time goes (kernels against host work), per kernel
timeout 120 $py benchmarks/profile_scan.py --device cuda --length 16384 \
    --backends triton "triton[64x4096x16]" "triton[seq128x2048x16]" mamba_ssm \
    > "$out/profile_scan_cuda.txt" 2>&1
if [ -f "$pre/nnUNetPlans.json" ]; then
  for backend in triton torch mamba_ssm; do
    BIOIMAGE_MAMBA_SCAN_BACKEND=$backend timeout 120 $py benchmarks/bench_network.py --device cuda --steps 5 --amp \
        -c 3d_fullres --plans "$pre/nnUNetPlans.json" --dataset-json "$pre/dataset.json" \
        --json "$out/bench_network_cuda_$backend.json" > "$out/bench_network_cuda_$backend.txt" 2>&1
  done
  # the 1000-step pairs of benchmarks/results/hippocampus_gpu.md (AMP, 2 augmentation workers per training), in
  # their own work folder (prepared there), so that no CPU checkpoint of the same trainers is continued
  timeout 900 $py benchmarks/eval_hippocampus.py --work "${work}_cuda" --device cuda --folds 0 1 --parallel 4 \
      --da-processes 2 --trainers nnUNetTrainer_40epochs_25iters nnUNetTrainerLoGVMamba_40epochs_25iters \
      --out "$out/hippocampus_gpu_1000.md" > "$out/hippocampus_gpu.txt" 2>&1
fi
tail -n 3 "$out"/*.txt
