#!/usr/bin/env bash
# Set up a lent GPU machine for benchmarks/gpu_check.sh. Those machines have torch, triton, nvcc and many packages,
# but not nnU-Net and its dependencies or mamba-ssm, and they cannot download anything. So:
#   bash benchmarks/gpu_setup.sh download    here, with the package registries: the wheels the GPU image lacks
#       (versions of constraints.txt, for its Python 3.12), the mamba-ssm sdist and the hippocampus plans (if
#       prepared here), into .whl/ (about 30 MB), and SimpleITK into .whl-simpleitk/ (53 MB), both git-ignored
#       through .git/info/exclude
#   bash benchmarks/gpu_setup.sh install     there (device `run` with carry [".whl"]): a venv at $GPU_VENV (default
#       /tmp/gpu_venv) that sees the machine's own packages, the carried wheels installed into it, this checkout on
#       its path with the nnU-Net start-up hook, and mamba-ssm's selective scan built for the GPU, fp32
#       (benchmarks/build_mamba_ssm_scan.py, about 2 min with 8 nvcc jobs; a failed build is reported and skipped).
#       Runs again in seconds: what is there is kept. SimpleITK does not fit in the same call (64 MiB carried at
#       most): what imports it (nnU-Net's trainers: one CUDA test of `gpu_check.sh profile`, its `hippocampus`
#       part) needs a call that carries [".whl-simpleitk"] and installs from it, on the same warm machine.
# A lent machine goes back after 30 s idle, so install goes in the same device call as what needs it:
#   bash benchmarks/gpu_setup.sh install && bash benchmarks/gpu_check.sh scan   (gpu_check's default Python is
#   that venv)
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

device_wheel() {  # folder, spec: the binary wheel of spec for the device's Python 3.12
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
      -d "$1" "$2"
}

case "$step" in
  download)
    py=${PYTHON:-.venv/bin/python}
    mkdir -p .git/info .whl .whl-simpleitk
    for d in /.whl/ /.whl-simpleitk/; do
      grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
    done
    for name in $WHEELS; do
      spec=$(pinned "$name")
      # a binary wheel for the device's Python 3.12; pure-Python packages published as sdists only are built here
      if ! device_wheel .whl "$spec" 2> .whl/download_error.txt; then
        built=$(mktemp -d)
        trap 'rm -rf "$built"' EXIT
        if ! $py -m pip wheel -q --no-deps -w "$built" "$spec" \
            || ! ls "$built"/*-none-any.whl > /dev/null 2>&1; then   # built for this Python: useless there
          echo "no wheel of $spec for Python 3.12 ($(tail -n 1 .whl/download_error.txt)), and no pure-Python" \
               "one built here" >&2
          exit 1
        fi
        mv "$built"/*.whl .whl/
        rm -rf "$built"
        trap - EXIT
      fi
    done
    rm -f .whl/download_error.txt
    $py -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d .whl "$MAMBA_SSM"
    device_wheel .whl-simpleitk "$(pinned simpleitk)"
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
    if ! ls .whl/*.whl > /dev/null 2>&1; then
      echo "no wheels in .whl: run gpu_setup.sh download here, and carry [\".whl\"] in the device call" >&2
      exit 1
    fi
    [ -x "$venv/bin/python" ] || $py -m venv --without-pip "$venv"
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # --without-pip: the venv borrows the machine's pip (and torch, triton, ...) through its site folders, added
    # with their own .pth files processed; rewritten on every run, so that an interrupted first run heals
    $py -c "import site; print('\n'.join(f'import site; site.addsitedir({p!r})' for p in site.getsitepackages()))" \
        > "$site/gpu_machine_site.pth"
    pwd > "$site/bioimage_mamba_checkout.pth"                      # this checkout, as an editable install has it
    cp startup_hook/nnunet_logmamba_startup.pth startup_hook/_nnunet_logmamba_startup.py "$site/"
    for d in .whl .whl-simpleitk; do
      if ls "$d"/*.whl > /dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$d"/*.whl
      fi
    done
    if [ -f .whl/hippocampus_plans/nnUNetPlans.json ] && [ ! -f "$pre/nnUNetPlans.json" ]; then
      mkdir -p "$pre" && cp .whl/hippocampus_plans/*.json "$pre/"
    fi
    # mamba-ssm's scan, for the comparison: optional, so a failed build leaves the rest of the setup in place
    sdist=$(ls .whl/mamba_ssm-*.tar.gz 2>/dev/null | head -n 1 || true)
    # (a failed build is not retried on this machine unless MAMBA_SSM_RETRY=1: it costs minutes each time)
    mamba_build=/tmp/mamba_ssm_build
    if [ -n "$sdist" ] && [ ! -f "$mamba_build/selective_scan_cuda.so" ] \
        && { [ ! -f "$mamba_build.failed" ] || [ "${MAMBA_SSM_RETRY:-0}" = 1 ]; }; then
      if ! MAX_JOBS=${MAX_JOBS:-8} "$venv/bin/python" benchmarks/build_mamba_ssm_scan.py --sdist "$sdist" \
          --out "$mamba_build" 2> "$mamba_build.failed"; then
        echo "mamba-ssm's scan did not build ($(tail -n 1 "$mamba_build.failed")): gpu_check.sh runs without it" >&2
      else
        rm -f "$mamba_build.failed"
      fi
    fi
    if [ -f "$mamba_build/selective_scan_cuda.so" ]; then
      echo "$mamba_build" > "$site/mamba_ssm_build.pth"
    fi
    # doctor's summary: the scan backends and the status (its list of trainers left out)
    "$venv/bin/python" -m nnunet_logmamba doctor > /tmp/gpu_setup_doctor.txt 2>&1 || true
    grep -v '^  ok ' /tmp/gpu_setup_doctor.txt | tail -n 15
    ;;
  *)
    echo "usage: bash benchmarks/gpu_setup.sh download|install (see the top of this file)" >&2
    exit 2 ;;
esac
