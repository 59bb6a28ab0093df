#!/usr/bin/env bash
# Everything that needs a GPU, for a machine with one, in parts, the most urgent first (each step under its own
# timeout):
#   bash benchmarks/gpu_check.sh scan      (default, ~7 min) Triton parity on the device (both kernel layouts),
#       the scan benchmark (torch / triton / mamba_ssm when installed), a sweep of the Triton sizes at 16k steps
#   bash benchmarks/gpu_check.sh profile   (~8 min) a kernel-by-kernel profile, the other CUDA tests, a VEMamba
#       and, where the plans of `python benchmarks/eval_hippocampus.py --prepare-only` exist, a LoG-VMamba training
#       step per scan backend with AMP, and LoG-VMamba against the plain network
#   bash benchmarks/gpu_check.sh all       scan, then profile (~14 min)
#   bash benchmarks/gpu_check.sh hippocampus   (~14 min, needs those plans) the hippocampus 1000-step pairs
# scan and profile each fit one 10-minute device call; hippocampus does not: start it in the background
# (`nohup bash benchmarks/gpu_check.sh hippocampus &`) and collect its output in a later call. Writes under
# ${OUT:-/tmp/gpu_check}; from the repository root. On a lent GPU machine, in the same call, first
# `bash benchmarks/gpu_setup.sh install` (with the wheels of `gpu_setup.sh download` carried): its venv
# (/tmp/gpu_venv) is then the default Python; elsewhere .venv (the README's install), or PYTHON=...
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=${GPU_VENV:-/tmp/gpu_venv}/bin/python; fi
work=${HIPPOCAMPUS_WORK:-/tmp/nnunet_logmamba_hippocampus}
pre=$work/nnUNet_preprocessed/Dataset004_Hippocampus
part=${1:-scan}
case "$part" in
  scan|profile|all) ;;
  hippocampus)
    if [ ! -d "$pre/nnUNetPlans_3d_fullres" ]; then
      echo "no preprocessed hippocampus data at $pre: run python benchmarks/eval_hippocampus.py --prepare-only" \
           "first" >&2
      exit 2
    fi ;;
  *) echo "unknown part '$part': scan, profile, all or hippocampus" >&2; exit 2 ;;
esac
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
$py -m nnunet_logmamba doctor > "$out/doctor.txt" 2>&1
if [ "$part" = scan ] || [ "$part" = all ]; then
  # the Triton kernels against the torch backend on the device, both layouts
  timeout 180 $py -m pytest -p no:cacheprovider -q -m cuda tests/test_selective_scan_triton.py \
      > "$out/cuda_tests_triton.txt" 2>&1
  # the issue's comparison (the reference loop takes seconds per repeat on a GPU: left out)
  timeout 120 $py benchmarks/bench_scan.py --device cuda --lengths 4096 16384 --long 65536 --repeats 10 \
      --backends torch triton mamba_ssm > "$out/bench_scan_cuda.txt" 2>&1
  # Triton sizes and layouts at 16k steps: the candidates of benchmarks/results/triton_resources.md
  timeout 200 $py benchmarks/bench_scan.py --device cuda --lengths 16384 --long 0 --repeats 10 \
      --backends triton mamba_ssm \
      --triton-tiles 64x4096r128 16x4096r128 32x4096r128 16x4096 32x4096 32x2048x8 seq256x4096 seq64x1024 \
      seq128x2048x16 \
      > "$out/bench_scan_sweep_cuda.txt" 2>&1
fi
if [ "$part" = profile ] || [ "$part" = all ]; then
  # where a step's time goes (kernels against host work), kernel by kernel: the default, the register-capped
  # gradient kernel and the candidates with the fewest instructions per layout (triton_resources.md)
  timeout 90 $py benchmarks/profile_scan.py --device cuda --length 16384 \
      --backends triton "triton[64x4096r128]" "triton[16x4096r128]" "triton[seq256x4096]" mamba_ssm \
      > "$out/profile_scan_cuda.txt" 2>&1
  # the other CUDA tests (AMP training steps, batched blocks)
  timeout 150 $py -m pytest -p no:cacheprovider -q -m cuda tests --ignore=tests/test_selective_scan_triton.py \
      > "$out/cuda_tests.txt" 2>&1
  # a VEMamba and (with the hippocampus plans) a LoG-VMamba training step per scan backend, AMP
  timeout 150 $py benchmarks/bench_training_step.py --device cuda --amp --plans "$pre/nnUNetPlans.json" \
      --dataset-json "$pre/dataset.json" --json "$out/bench_training_step_cuda.json" \
      > "$out/bench_training_step_cuda.txt" 2>&1
  if [ -f "$pre/nnUNetPlans.json" ]; then  # LoG-VMamba against the plain network of the same plans, auto backend
    timeout 60 $py benchmarks/bench_network.py --device cuda --steps 5 --amp -c 3d_fullres \
        --plans "$pre/nnUNetPlans.json" --dataset-json "$pre/dataset.json" \
        --json "$out/bench_network_cuda.json" > "$out/bench_network_cuda.txt" 2>&1
  fi
fi
if [ "$part" = hippocampus ]; then
  # the 1000-step pairs of benchmarks/results/hippocampus_gpu.md (AMP, 2 augmentation workers per training), in
  # their own work folder (prepared there), so that no CPU checkpoint of the same trainers is continued
  timeout 840 $py benchmarks/eval_hippocampus.py --work "${work}_cuda" --device cuda --folds 0 1 --parallel 4 \
      --da-processes 2 --trainers nnUNetTrainer_40epochs_25iters nnUNetTrainerLoGVMamba_40epochs_25iters \
      --out "$out/hippocampus_gpu_1000.md" > "$out/hippocampus_gpu.txt" 2>&1
fi
tail -n 3 "$out"/*.txt
