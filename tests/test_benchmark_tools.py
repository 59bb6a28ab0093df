"""The benchmark tools that write the tables and figures of benchmarks/results (run on a CPU, small inputs)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def eval_hippocampus(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import eval_hippocampus
    return eval_hippocampus


def test_learning_curves_survive_the_table_and_are_drawn(eval_hippocampus, tmp_path):
    """write_table -> curves_from_markdown gives back every curve; plot_learning_curves writes a PNG."""
    curve = [{"epoch": e, "train_loss": 0.5 - 0.1 * e, "val_loss": 0.4 - 0.1 * e, "pseudo_dice": [0.1 * e, 0.2 * e]}
             for e in range(4)]
    rows = [{"trainer": trainer, "fold": fold, "minutes": 1.0, "curve": curve, "dice": {"1": 0.8, "2": 0.7},
             "mean": 0.75}
            for fold in (0, 1) for trainer in ("nnUNetTrainer_2epochs", "nnUNetTrainerLoGVMamba_2epochs")]
    table = str(tmp_path / "table.md")
    eval_hippocampus.write_table(rows, {"background": 0, "Anterior": 1, "Posterior": 2}, table, "cmd", "3d_fullres")
    assert "![learning curves](table_curves.png)" in Path(table).read_text()
    back = eval_hippocampus.curves_from_markdown(table)
    assert [(r["fold"], r["trainer"]) for r in back] == [(r["fold"], r["trainer"]) for r in rows]
    for r in back:
        assert [e["epoch"] for e in r["curve"]] == [0, 1, 2, 3]
        for got, want in zip(r["curve"], curve):
            assert math.isclose(got["val_loss"], want["val_loss"], abs_tol=1e-3)
            assert got["pseudo_dice"] == pytest.approx(want["pseudo_dice"], abs=0.005)
    figure = eval_hippocampus.plot_learning_curves(back, eval_hippocampus.figure_path(table))
    assert figure.endswith("table_curves.png")
    assert Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_table_without_curves_is_refused(eval_hippocampus, tmp_path):
    table = tmp_path / "other.md"
    table.write_text("# something else\n\n| a | b |\n")
    with pytest.raises(SystemExit, match="no learning curves"):
        eval_hippocampus.curves_from_markdown(str(table))


def test_profile_scan_reports_time_per_operator(tmp_path):
    """benchmarks/profile_scan.py end to end on a CPU: one section per backend, operators with their time."""
    script = BENCHMARKS / "profile_scan.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--length", "32", "--repeats", "2",
                           "--backends", "torch", "no_such_backend", "--top", "3"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header = re.search(r"## torch, length 32, cpu: wall ([0-9.]+) ms per step, ([0-9.]+) ms in (\d+)", done.stdout)
    assert header, done.stdout
    wall, busy, calls = float(header.group(1)), float(header.group(2)), int(header.group(3))
    assert wall > 0 and busy > 0 and calls > 0      # no ratio: both are timings on a shared machine
    rows = re.findall(r"^\| `aten::[^`]+` \| ([0-9.]+) \| (\d+) \|$", done.stdout, re.M)
    assert 1 <= len(rows) <= 3
    assert "# no_such_backend: failed" in done.stdout   # a failing backend is reported, the others still run


def test_triton_sizes_and_layout_from_the_tuning_string(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_scan
    import nnunet_logmamba.ssm.triton_kernel as tk
    for name in ("LAYOUT", "CHUNK", "SEQUENTIAL_CHUNK", "TILE", "WARPS", "GRADIENT_REGISTERS"):
        monkeypatch.setattr(tk, name, getattr(tk, name))   # restored after the test
    bench_scan.configure_triton("64x4096r128")
    assert (tk.LAYOUT, tk.CHUNK, tk.TILE, tk.WARPS, tk.GRADIENT_REGISTERS) == ("parallel", 64, 4096, None, 128)
    assert tk._launch_shape(2, 64, 1, 16, 16384, tk.LAYOUT)["gradient_registers"] == 128
    bench_scan.configure_triton("seq128x2048x4")
    assert (tk.LAYOUT, tk.SEQUENTIAL_CHUNK, tk.TILE, tk.WARPS, tk.GRADIENT_REGISTERS) == (
        "sequential", 128, 2048, 4, None)
    bench_scan.configure_triton("32x4096x8r96")
    assert (tk.LAYOUT, tk.CHUNK, tk.TILE, tk.WARPS, tk.GRADIENT_REGISTERS) == ("parallel", 32, 4096, 8, 96)
    bench_scan.configure_triton("32x4096")
    assert (tk.LAYOUT, tk.CHUNK, tk.TILE, tk.WARPS, tk.GRADIENT_REGISTERS) == ("parallel", 32, 4096, None, None)
    bench_scan.configure_triton("64x4096r24")
    assert tk.GRADIENT_REGISTERS == 24
    for bad in ("seq256", "64x4096x8x2", "64xlots", "seq64x1024r128", "64x4096r", "64x4096r23", "64x4096r256"):
        with pytest.raises(ValueError, match=r"\[seq\]CHUNKxTILE\[xWARPS\]\[rREGISTERS\]"):
            bench_scan.configure_triton(bad)
    before = (tk.LAYOUT, tk.CHUNK, tk.TILE, tk.WARPS, tk.GRADIENT_REGISTERS)
    for bad, named in (("48x4096", "CHUNK 48"), ("64x3000", "TILE 3000"), ("64x4096x6", "WARPS 6"),
                       ("1x4096", "CHUNK 1"), ("seq96x2048x16", "CHUNK 96"), ("128x64", "CHUNK 128 > TILE 64"),
                       ("64x4096x64", "WARPS 64")):
        with pytest.raises(ValueError, match=rf"powers of two.*\(got {named}"):
            bench_scan.configure_triton(bad)
    assert (tk.LAYOUT, tk.CHUNK, tk.TILE, tk.WARPS, tk.GRADIENT_REGISTERS) == before   # nothing half-set


def test_training_step_benchmark_times_each_backend_in_its_own_process(tmp_path):
    """bench_training_step.py runs the shipped VEMamba model's training step once per scan backend (CPU here, one
    patch), writes the rows it prints, skips LoG-VMamba with the reason when no plans exist, and refuses a
    backend the device does not have."""
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_training_step.py"), "--device", "cpu", "--backends", "torch",
           "reference", "--batch-size", "1", "--steps", "1", "--threads", "1", "--plans", str(tmp_path / "none.json"),
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "logvmamba skipped: no plans at" in done.stdout
    import json
    rows = json.loads(out.read_text())
    assert [(r["network"], r["backend"]) for r in rows] == [("vemamba", "torch"), ("vemamba", "reference")]
    for r in rows:
        assert r["finite"] and r["seconds"] > 0 and r["batch"] == 1 and r["patch"] == [8, 32, 32]
    assert re.search(r"vemamba\s+reference\s+1\s+8x32x32\s+[\d.]+\s+-\s+[\d.]+x\s+True", done.stdout), done.stdout
    bad = subprocess.run(cmd[:5] + ["mamba_ssm"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not available on cpu" in bad.stderr


def test_mamba_ssm_build_stubs_exactly_the_kernels_it_leaves_out(monkeypatch):
    """selective_scan.cpp dispatches u's dtype (fp32, fp16, bf16) x A's (real, complex) each way; the fp32 build
    compiles some of those twelve kernels (mamba-ssm 2.3: fwd fp32 real and complex, bwd fp32 real, read from the
    sources' explicit instantiations) and must define the others as stubs: one missing gives an undefined symbol
    at import, one twice a duplicate symbol at link."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import build_mamba_ssm_scan as build
    sources = ["// fwd fp32\ntemplate void selective_scan_fwd_cuda<float, float>(SSMParamsBase &params, "
               "cudaStream_t stream);\ntemplate void selective_scan_fwd_cuda<float, complex_t>(SSMParamsBase &params, "
               "cudaStream_t stream);",
               "template void selective_scan_bwd_cuda<float, float>(SSMParamsBwd &params, cudaStream_t stream);",
               "template<typename input_t, typename weight_t>\nvoid selective_scan_fwd_cuda(SSMParamsBase &params, "
               "cudaStream_t stream);  // a declaration, as in selective_scan.cpp: not an instantiation"]
    missing = build.missing_kernels(sources)
    every = {(way, i, w) for way in ("fwd", "bwd") for i in ("float", "at::Half", "at::BFloat16")
             for w in ("float", "complex_t")}
    compiled = {("fwd", "float", "float"), ("fwd", "float", "complex_t"), ("bwd", "float", "float")}
    stubbed = {(way, i, w) for way, pairs in missing.items() for i, w in pairs}
    assert stubbed == every - compiled and sum(map(len, missing.values())) == 9
    source = build.stub_source(missing)
    params = {"fwd": "SSMParamsBase", "bwd": "SSMParamsBwd"}
    for way, i, w in stubbed:
        assert f"template void selective_scan_{way}_cuda<{i}, {w}>({params[way]} &, cudaStream_t);" in source
    assert source.count("TORCH_CHECK(false") == 2      # one generic body each way, naming this build
    assert not any(f"selective_scan_{way}_cuda<{i}, {w}>" in source for way, i, w in compiled)
    # another release's dtypes, or sources without any instantiation, are refused rather than guessed at
    for odd in (["template void selective_scan_fwd_cuda<at::Float8, float>(SSMParamsBase &, cudaStream_t);"], []):
        with pytest.raises(SystemExit, match="unexpected kernel instantiations"):
            build.missing_kernels(odd)


def test_mamba_ssm_build_refuses_what_is_not_its_sdist(tmp_path):
    import tarfile
    script = str(BENCHMARKS / "build_mamba_ssm_scan.py")
    missing = subprocess.run([sys.executable, script, "--sdist", str(tmp_path / "none.tar.gz"), "--out",
                              str(tmp_path / "out")], capture_output=True, text=True)
    assert missing.returncode != 0 and "no sdist at" in missing.stderr and "pip download" in missing.stderr
    (tmp_path / "pkg" / "other").mkdir(parents=True)
    (tmp_path / "pkg" / "other" / "setup.py").write_text("")
    foreign = tmp_path / "other-1.0.tar.gz"
    with tarfile.open(foreign, "w:gz") as archive:
        archive.add(tmp_path / "pkg" / "other", arcname="other-1.0")
    for sdist, why in ((foreign, "no csrc/selective_scan"), (tmp_path / "pkg" / "other" / "setup.py", "readable")):
        done = subprocess.run([sys.executable, script, "--sdist", str(sdist), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True)
        assert done.returncode != 0 and "is not a mamba-ssm sdist" in done.stderr and why in done.stderr
    assert not (tmp_path / "out").exists()                 # refused before anything was written
    # --out is replaced as a whole: a folder holding anything else is refused, before the compile, and kept
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    done = subprocess.run([sys.executable, script, "--sdist", str(foreign), "--out", str(tmp_path / "mine")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "folder of its own" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_gpu_setup_wheels_are_pinned_and_unknown_steps_refused():
    """Every package gpu_setup.sh carries to the GPU machine has a version in constraints.txt (the one CI tests),
    and the script names its steps when given another."""
    script = (BENCHMARKS / "gpu_setup.sh").read_text()
    names = re.search(r'WHEELS="([^"]+)"', script).group(1).split()
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    pins = {norm(line.split("==")[0]) for line in (BENCHMARKS.parent / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert len(names) > 10 and {norm(n) for n in names} <= pins, {norm(n) for n in names} - pins
    assert "nnunetv2" in names and "torch" not in names      # the machine's own torch is used
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_setup.sh"), "upload"], capture_output=True, text=True)
    assert done.returncode == 2 and "download|install" in done.stderr


def test_gpu_check_refuses_unknown_parts_and_missing_hippocampus_data(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "HIPPOCAMPUS_WORK": str(tmp_path / "work"),
           "HIPPOCAMPUS_SOURCE": str(tmp_path / "no_task")}
    script = str(BENCHMARKS / "gpu_check.sh")
    unknown = subprocess.run(["bash", script, "scna"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "unknown part 'scna'" in unknown.stderr
    # plans alone (what gpu_setup.sh carries for the training-step benchmark) are not the data a training needs,
    # and the training runs in its own folder (work + "_cuda"), prepared from the MSD task
    for work in ("work", "work_cuda"):
        plans = tmp_path / work / "nnUNet_preprocessed" / "Dataset004_Hippocampus"
        plans.mkdir(parents=True)
        (plans / "nnUNetPlans.json").write_text("{}")
    no_data = subprocess.run(["bash", script, "hippocampus"], capture_output=True, text=True, env=env)
    assert no_data.returncode == 2 and "HIPPOCAMPUS_SOURCE" in no_data.stderr and "no_task" in no_data.stderr
    assert not (tmp_path / "out" / "nvidia-smi.txt").exists()      # refused before running anything


def test_gpu_check_refuses_a_python_without_the_project(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(tmp_path / "missing" / "python")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "scan"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2 and "gpu_setup.sh install" in done.stderr
    assert not (tmp_path / "out" / "nvidia-smi.txt").exists()
