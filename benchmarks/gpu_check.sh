#!/usr/bin/env bash
# Everything that needs a GPU, for a machine with one, in parts, the most urgent first (each step under its own
# timeout). A lent machine goes back after 30 s idle, so each device call starts bare: the first sets up too.
#   bash benchmarks/gpu_setup.sh install && bash benchmarks/gpu_check.sh scan    (at most 2.5 + 5.5 min) the scan
#       benchmark (torch / triton / mamba_ssm) at 4k-64k steps and a sweep of the Triton sizes at 16k steps
#   PYTHON=python3 PYTHONPATH=. bash benchmarks/gpu_check.sh parity    (at most 4 min, needs no setup: the machine's
#       torch, triton and pytest) the Triton kernels against the torch backend on the device
#   bash benchmarks/gpu_check.sh profile   (~8 min, after gpu_setup.sh install) a kernel-by-kernel profile, the
#       other CUDA tests, a VEMamba and, with the hippocampus plans, a LoG-VMamba training step per scan backend
#       with AMP, and LoG-VMamba against the plain network
#   bash benchmarks/gpu_check.sh all       scan, parity, then profile
#   bash benchmarks/gpu_check.sh hippocampus   (~14 min) the hippocampus 1000-step pairs, in ${HIPPOCAMPUS_WORK}_cuda,
#       prepared there from the MSD task at HIPPOCAMPUS_SOURCE unless already done; longer than a device call and
#       than a session's 15 device minutes, and its data (24 MB) and SimpleITK (53 MB) do not travel with the
#       wheels in one call: it does not fit a lent machine as lent today (2026-12), only a GPU machine of one's own
# Writes under ${OUT:-/tmp/gpu_check}; from the repository root. Python: PYTHON, else .venv (the README's install),
# else the venv of gpu_setup.sh install (/tmp/gpu_venv).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=${GPU_VENV:-/tmp/gpu_venv}/bin/python; fi
work=${HIPPOCAMPUS_WORK:-/tmp/nnunet_logmamba_hippocampus}
pre=$work/nnUNet_preprocessed/Dataset004_Hippocampus
# the hippocampus part trains in its own folder, prepared there from the MSD task (HIPPOCAMPUS_SOURCE)
source_task=${HIPPOCAMPUS_SOURCE:-/work/shared/data/med/Task04_Hippocampus}
cuda_pre=${work}_cuda/nnUNet_preprocessed/Dataset004_Hippocampus
part=${1:-scan}
case "$part" in
  scan|parity|profile|all) ;;
  hippocampus)
    if [ ! -d "$cuda_pre/nnUNetPlans_3d_fullres" ] \
        && [ ! -f "$source_task/dataset.json" ]; then
      echo "no hippocampus data: neither preprocessed data in ${work}_cuda nor the MSD task at $source_task" \
           "(set HIPPOCAMPUS_SOURCE to the Task04_Hippocampus folder)" >&2
      exit 2
    fi ;;
  *) echo "unknown part '$part': scan, parity, profile, all or hippocampus" >&2; exit 2 ;;
esac
# -P: the check must not find this checkout through the current folder, which the benchmark scripts do not see
if ! "$py" -P -c "import torch, nnunet_logmamba" 2> "$out/python_error.txt"; then
  echo "$py cannot import torch and nnunet_logmamba ($(tail -n 1 "$out/python_error.txt")): run" \
       "bash benchmarks/gpu_setup.sh install first, or set PYTHON" >&2
  exit 2
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
if [ "$part" != parity ]; then   # doctor needs nnU-Net, which parity's bare machine Python lacks
  $py -m nnunet_logmamba doctor > "$out/doctor.txt" 2>&1
fi
if [ "$part" = scan ] || [ "$part" = all ]; then
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
if [ "$part" = parity ] || [ "$part" = all ]; then
  # the Triton kernels against the torch backend on the device, both layouts, with and without the register cap
  # (40 cases, each compiled on a fresh machine; a timeout still leaves pytest's progress)
  timeout 240 $py -m pytest -p no:cacheprovider -q -m cuda tests/test_selective_scan_triton.py \
      > "$out/cuda_tests_triton.txt" 2>&1
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
  timeout 840 $py benchmarks/eval_hippocampus.py --work "${work}_cuda" --source "$source_task" --device cuda \
      --folds 0 1 --parallel 4 \
      --da-processes 2 --trainers nnUNetTrainer_40epochs_25iters nnUNetTrainerLoGVMamba_40epochs_25iters \
      --out "$out/hippocampus_gpu_1000.md" > "$out/hippocampus_gpu.txt" 2>&1
fi
tail -n 3 "$out"/*.txt
