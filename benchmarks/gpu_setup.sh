#!/usr/bin/env bash
# Set up a lent GPU machine for benchmarks/gpu_check.sh. Those machines have torch, triton, nvcc and many packages,
# but not nnU-Net and its dependencies or mamba-ssm, and they cannot download anything. So:
#   bash benchmarks/gpu_setup.sh download    here, with the package registries: the wheels the GPU image lacks
#       (versions of constraints.txt, for its Python 3.12), the mamba-ssm sdist and the hippocampus plans (if
#       prepared here), into .whl/ (about 30 MB),
#       and SimpleITK (53 MB; only nnU-Net's trainers and 4 test modules import it) into .whl-simpleitk/,
#       both git-ignored through .git/info/exclude
#   bash benchmarks/gpu_setup.sh install     there (device `run`, carry [".whl"], or [".whl-simpleitk"] in a
#       separate call: the 64 MiB carry limit): a venv at $GPU_VENV (default /tmp/gpu_venv) that sees the machine's
#       own packages, the carried wheels installed into it, this checkout on its path with the nnU-Net start-up
#       hook, and mamba-ssm's selective scan built for the GPU, fp32 (benchmarks/build_mamba_ssm_scan.py, about 2
#       min with 8 nvcc jobs). Runs again in seconds: what is there is kept.
# Then, in the same call (a fresh machine is bare):  PYTHON=/tmp/gpu_venv/bin/python bash benchmarks/gpu_check.sh scan
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-}
venv=${GPU_VENV:-/tmp/gpu_venv}
pre=${HIPPOCAMPUS_WORK:-/tmp/nnunet_logmamba_hippocampus}/nnUNet_preprocessed/Dataset004_Hippocampus
# Our dependencies (pip install -c constraints.txt ".[dev]") that the GPU image's package list
# (.library/device/KINDS.md, 2026-11-17) does not hold; the image's torch, numpy, scipy, ... are used as they are.
WHEELS="acvl-utils annotated-types batchgenerators batchgeneratorsv2 blosc2 connected-components-3d donfig
dynamic-network-architectures future google-crc32c graphviz linecache2 ndindex nibabel nnunetv2 numcodecs numexpr
pydantic pydantic-core traceback2 typing-inspection unittest2 yacs zarr"
MAMBA_SSM=mamba-ssm==2.3.2.post1
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

pinned() {  # name -> name==version from constraints.txt (names compared as pip normalises them)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS= read -r line; do
    case "$line" in "#"*|"") continue ;; esac
    if [ "$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')" = "$want" ]; then echo "$line"; return; fi
  done < constraints.txt
  echo "no pin for $1 in constraints.txt" >&2; return 1
}

case "$step" in
  download)
    py=${PYTHON:-.venv/bin/python}
    mkdir -p .git/info .whl .whl-simpleitk
    for d in /.whl/ /.whl-simpleitk/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
    for name in $WHEELS; do
      spec=$(pinned "$name")
      # a binary wheel for the device's Python 3.12; pure-Python packages published as sdists only are built here
      $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
          -d .whl "$spec" 2>/dev/null || $py -m pip wheel -q --no-deps -w .whl "$spec"
    done
    $py -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d .whl "$MAMBA_SSM"
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
        -d .whl-simpleitk "$(pinned simpleitk)"
    # the hippocampus plans (no images: a few kB) for the LoG-VMamba training step of gpu_check.sh profile
    if [ -f "$pre/nnUNetPlans.json" ]; then
      mkdir -p .whl/hippocampus_plans
      cp "$pre/nnUNetPlans.json" "$pre/dataset.json" .whl/hippocampus_plans/
    else
      echo "no hippocampus plans at $pre (python benchmarks/eval_hippocampus.py --prepare-only makes them):" \
           "gpu_check.sh profile will time the VEMamba step only" >&2
    fi
    du -sh .whl .whl-simpleitk
    ;;
  install)
    py=${PYTHON:-python3}
    if [ ! -x "$venv/bin/python" ]; then
      # --without-pip: the venv borrows the machine's pip (and torch, triton, ...) through a .pth of its site folders
      $py -m venv --without-pip "$venv"
      site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      $py -c "import site; print('\n'.join(site.getsitepackages()))" > "$site/gpu_machine_site.pth"
    fi
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    pwd > "$site/bioimage_mamba_checkout.pth"                      # this checkout, as an editable install has it
    cp startup_hook/nnunet_logmamba_startup.pth startup_hook/_nnunet_logmamba_startup.py "$site/"
    for d in .whl .whl-simpleitk; do
      if ls "$d"/*.whl > /dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$d"/*.whl
      fi
    done
    sdist=$(ls .whl/mamba_ssm-*.tar.gz 2>/dev/null | head -n 1 || true)
    if [ -n "$sdist" ] && [ ! -f /tmp/mamba_ssm_build/selective_scan_cuda.so ]; then
      MAX_JOBS=${MAX_JOBS:-8} "$venv/bin/python" benchmarks/build_mamba_ssm_scan.py --sdist "$sdist" \
          --out /tmp/mamba_ssm_build
    fi
    if [ -f .whl/hippocampus_plans/nnUNetPlans.json ] && [ ! -f "$pre/nnUNetPlans.json" ]; then
      mkdir -p "$pre" && cp .whl/hippocampus_plans/*.json "$pre/"
    fi
    if [ -f /tmp/mamba_ssm_build/selective_scan_cuda.so ]; then
      echo /tmp/mamba_ssm_build > "$site/mamba_ssm_build.pth"
    fi
    "$venv/bin/python" -m nnunet_logmamba doctor | head -n 30 || true
    ;;
  *)
    echo "usage: bash benchmarks/gpu_setup.sh download|install (see the top of this file)" >&2
    exit 2 ;;
esac
