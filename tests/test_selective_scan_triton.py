"""The Triton backend against the reference: forward and every gradient, in Triton's CPU interpreter.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which must be set before triton is first
imported, so the cases run in one fresh interpreter process (module fixture) and each test reads its
case's errors. The chunk length is cut to 4 there, so that lengths 7 and 130 cross many of the chunk
boundaries whose saved states the backward pass starts from. Both layouts of the kernels run every
case: chunks in parallel joined by a scan of their summaries, and chunks walked in order by one
program. On a GPU, ``test_cuda_*`` run the same
comparison on the device.
"""
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from nnunet_logmamba.ssm import dispatch, selective_scan

# (name, batch, dim, length, state, groups, options, dtype)
ALL = dict(D=True, z=True, bias=True, softplus=True, last=True)
CASES = [
    ("length1", 2, 3, 1, 4, 1, ALL, "float32"),
    ("length7_odd_dim", 2, 5, 7, 3, 1, ALL, "float32"),
    ("length130_grouped", 2, 4, 130, 5, 2, ALL, "float32"),
    ("length7_bare_grouped", 1, 6, 7, 4, 2, dict(D=False, z=False, bias=False, softplus=False, last=False),
     "float32"),
    ("length130_gate_only", 1, 3, 130, 2, 1, dict(D=False, z=True, bias=False, softplus=True, last=False),
     "float32"),
    ("length7_bf16", 2, 4, 7, 4, 2, ALL, "bfloat16"),
    ("length7_fp16", 1, 3, 7, 4, 1, ALL, "float16"),
    # only the last state reaches the loss: backward gets no output gradient at all
    ("length7_last_only", 1, 3, 7, 4, 1, {**ALL, "y_in_loss": False}, "float32"),
]

CHECKER = textwrap.dedent('''
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import nnunet_logmamba.ssm.triton_kernel as tk
    from nnunet_logmamba.ssm import selective_scan
    tk.CHUNK = tk.SEQUENTIAL_CHUNK = 4
    tk.CARRY_BLOCK = 2
    NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    # (layout, programs wanted): "sequential" keeps wide channel blocks (masked channels in every odd-dim
    # case), "sequential_narrow" narrows them to one channel per program
    LAYOUTS = {"parallel": ("parallel", 1), "sequential": ("sequential", 1),
               "sequential_narrow": ("sequential", 10 ** 6)}
    # which kernels ran and with how many channels per program: a layout that silently fell back to the
    # other one would otherwise pass every comparison
    launched, shapes, caps = set(), [], []

    class Counted:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(tk, name)

        def __getitem__(self, grid):
            launched.add(self.name)
            kernel = self.kernel[grid]

            def launch(*args, **options):   # the register cap is a launch option (the interpreter ignores it)
                if self.name == "_backward_gradient_kernel":
                    caps.append(options.get("maxnreg"))
                return kernel(*args, **options)
            return launch

    for kernel in ("_forward_output_kernel", "_backward_gradient_kernel", "_sequential_forward_kernel",
                   "_sequential_backward_kernel"):
        setattr(tk, kernel, Counted(kernel))
    launch_shape = tk._launch_shape
    tk._launch_shape = lambda *args: shapes.append(launch_shape(*args)) or shapes[-1]

    def run(case):
        name, batch, dim, length, state, groups, opt, dtype = case
        dtype = getattr(torch, dtype)
        g = torch.Generator().manual_seed(len(name))
        r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale
        bc = (batch, groups, state, length) if groups > 1 else (batch, state, length)
        inputs = [r(batch, dim, length).to(dtype), r(batch, dim, length, scale=0.5).to(dtype),
                  -(torch.rand(dim, state, generator=g) + 0.2), r(*bc).to(dtype), r(*bc).to(dtype),
                  r(dim) if opt["D"] else None, r(batch, dim, length).to(dtype) if opt["z"] else None,
                  r(dim, scale=0.3) if opt["bias"] else None]
        weights = torch.linspace(-1, 1, batch * dim * length).view(batch, dim, length)
        found = {}
        for backend in ("triton", "reference"):
            xs = [None if t is None else t.clone().requires_grad_() for t in inputs]
            out = selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=opt["softplus"],
                                 return_last_state=opt["last"], backend=backend)
            y, last = out if opt["last"] else (out, None)
            loss = (y.float() * weights).sum() if opt.get("y_in_loss", True) else 0
            loss = loss + (0.7 * last.sum() if last is not None else 0)
            loss.backward()
            found[backend] = {"y": y.detach().float(), "y_dtype": str(y.dtype),
                              **({"last": last.detach().float()} if last is not None else {}),
                              **{"d" + n: (x.grad if x.grad is not None else torch.zeros_like(x)).float()
                                 for n, x in zip(NAMES, xs) if x is not None}}
        tri, ref = found["triton"], found["reference"]
        errors = {k: float((tri[k] - ref[k]).abs().max() / (ref[k].abs().max() + 1e-6))
                  for k in ref if k != "y_dtype"}
        return {"errors": errors, "y_dtype": tri["y_dtype"], "ref_dtype": ref["y_dtype"],
                "finite": all(bool(torch.isfinite(v).all()) for k, v in tri.items() if k != "y_dtype")}

    results = {}
    cases = json.loads(sys.argv[1])
    # every case in every layout, and one with the backward gradient kernel's register cap
    runs = [(layout, case) for layout in LAYOUTS for case in cases] + [("parallel_capped", cases[1])]
    LAYOUTS["parallel_capped"] = ("parallel", 1)
    for layout, case in runs:
        tk.LAYOUT, tk.SEQUENTIAL_PROGRAMS = LAYOUTS[layout]
        tk.GRADIENT_REGISTERS = 128 if layout == "parallel_capped" else None
        launched.clear(), shapes.clear(), caps.clear()
        result = run(case)
        result.update(kernels=sorted(launched), channels_per_program=[s["block_d"] for s in shapes],
                      gradient_caps=list(caps))
        results[f"{layout}/{case[0]}"] = result
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECKER, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel", "sequential", "sequential_narrow"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_kernels_match_the_reference_in_the_interpreter(case, layout, interpreter_results):
    name, *_, options, dtype = case
    result = interpreter_results[f"{layout}/{name}"]
    # no register cap unless one is set (the default); the sequential layout has no gradient kernel
    assert result["gradient_caps"] == ([] if layout.startswith("sequential") else [None])
    assert result["finite"]
    assert result["y_dtype"] == result["ref_dtype"] == f"torch.{dtype}"  # output in u's dtype
    optional = {"last": "last", "D": "dD", "z": "dz", "bias": "ddelta_bias"}
    expected = {"y", "du", "ddelta", "dA", "dB", "dC"} | {key for opt, key in optional.items() if options[opt]}
    assert set(result["errors"]) == expected
    # fp32 state and accumulation: fp32 inputs agree to rounding; half inputs to their own rounding
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    assert max(result["errors"].values()) < tolerance, result["errors"]
    sequential = layout.startswith("sequential")
    assert result["kernels"] == (["_sequential_backward_kernel", "_sequential_forward_kernel"] if sequential
                                 else ["_backward_gradient_kernel", "_forward_output_kernel"])
    if layout == "sequential_narrow":
        assert set(result["channels_per_program"]) == {1}
    elif sequential:  # wide blocks: wider than the group's channels where those are odd, so some are masked
        assert min(result["channels_per_program"]) > 1


@pytest.mark.slow
def test_triton_register_cap_reaches_the_gradient_kernel_launch(interpreter_results):
    """``GRADIENT_REGISTERS`` goes to the backward gradient kernel's launch as ``maxnreg`` (a compiler option: the
    interpreter ignores it, the compile test checks its effect on the machine code, the CUDA test its results)."""
    result = interpreter_results[f"parallel_capped/{CASES[1][0]}"]
    assert result["gradient_caps"] == [128]
    assert result["kernels"] == ["_backward_gradient_kernel", "_forward_output_kernel"]
    assert result["finite"] and max(result["errors"].values()) < 1e-4, result["errors"]


SUMMARY_ROUNDING = textwrap.dedent('''
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import nnunet_logmamba.ssm.triton_kernel as tk
    from nnunet_logmamba.ssm import selective_scan
    assert tk.LAYOUT == "parallel" and tk.CHUNK == 64
    # two chunks of 64 steps whose first 60 steps have dt = 40 and the last 4 dt = 0.01: the chunk's total dt
    # is 2400, whose rounding (2.4e-4) times |A| = 16 would be a 0.4 % error in the last steps' weights if the
    # decay after each step were taken as (total) - (dt up to the step)
    length, dt = 128, torch.full((128,), 40.0)
    dt[60:64] = dt[124:] = 0.01
    delta = torch.log(torch.expm1(dt)).view(1, 1, length).repeat(1, 2, 1)   # softplus(delta) = dt
    g = torch.Generator().manual_seed(0)
    u, B, C = (torch.randn(1, 2, length, generator=g), torch.randn(1, 2, length, generator=g),
               torch.randn(1, 2, length, generator=g))
    A = torch.tensor([[-16.0, -0.5], [-1.0, -8.0]])
    errors = {}
    found = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        xs = [t.to(dtype).clone().requires_grad_() for t in (u, delta, A, B, C)]
        y, last = selective_scan(*xs, delta_softplus=True, return_last_state=True, backend=backend)
        (y * torch.linspace(-1, 1, length, dtype=dtype)).sum().add(last.sum()).backward()
        found[backend] = [y, last] + [x.grad for x in xs]
    for name, t, r in zip(["y", "last", "du", "ddelta", "dA", "dB", "dC"], found["triton"], found["reference"]):
        errors[name] = float((t.double() - r).abs().max() / r.abs().max())
    print(json.dumps(errors))
''')


@pytest.mark.slow
def test_triton_chunk_summaries_keep_fp32_accuracy_when_dt_varies_widely():
    """At the default chunk length, a chunk's summary (its end state from a zero start, and the adjoint's
    counterpart) weights each step's input by its decay over the chunk's other steps; dt that spans 0.01 to 40
    within a chunk must not cost the output, the last state or the gradients more than fp32 rounding."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SUMMARY_ROUNDING], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"y", "last", "du", "ddelta", "dA", "dB", "dC"}
    # the torch backend's fp32 errors here are 4e-8 to 1.5e-7; (chunk total) - (dt up to a step) as the
    # summaries' exponents gave 2.7e-4 for the last state
    assert max(v for k, v in errors.items() if k != "dA") < 2e-6, errors
    # dA comes from exp(dt A) h_{t-1} taken as h_t - dt u B, whose difference loses digits where a step's decay
    # is close to 0 (dt A = -640 here); 2.9e-5, as before the summaries changed
    assert errors["dA"] < 1e-4, errors


def test_triton_backend_says_clearly_why_it_cannot_run(monkeypatch):
    import nnunet_logmamba.ssm.triton_kernel as tk

    u = torch.randn(1, 2, 3)
    args = (u, u.clone(), -torch.ones(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if tk.triton is not None:  # installed: CPU tensors outside the interpreter are refused with the fix
        with pytest.raises(RuntimeError, match="runs on CUDA tensors.*backend='torch'"):
            selective_scan(*args, backend="triton")
        with pytest.raises(RuntimeError, match="fp64"):
            selective_scan(*[a.double() for a in args], backend="triton")
    monkeypatch.setattr(tk, "triton", None)
    monkeypatch.setattr(tk, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="triton does not import.*No module named 'triton'"):
        selective_scan(*args, backend="triton")
    assert "triton" not in dispatch.available_backends("cuda")


@pytest.mark.parametrize("mamba, triton, expected", [(True, True, "mamba_ssm"), (False, True, "triton"),
                                                     (False, False, "torch")])
def test_auto_prefers_mamba_ssm_then_triton_then_torch_on_cuda(monkeypatch, mamba, triton, expected):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "kernel_supports", lambda u, A: mamba)
    monkeypatch.setattr(dispatch, "triton_supports", lambda u: triton)
    monkeypatch.setattr(dispatch, "_backend_works", lambda backend, u: True)   # probes: see the test below
    cuda_tensor = SimpleNamespace(is_cuda=True)
    assert dispatch.resolve_backend("auto", cuda_tensor, torch.zeros(4, 16)) == expected
    # a state too large for the kernel's register block goes to torch
    if not mamba:
        assert dispatch.resolve_backend("auto", cuda_tensor, torch.zeros(4, 512)) == "torch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert dispatch.resolve_backend("auto", cuda_tensor, torch.zeros(4, 16)) == "torch"
    assert dispatch.resolve_backend("auto", torch.zeros(1, 4, 2), torch.zeros(4, 16)) == "torch"


def test_a_sequence_of_more_chunks_than_a_grid_holds_runs_in_the_sequential_layout(monkeypatch):
    import nnunet_logmamba.ssm.triton_kernel as tk
    if tk.triton is None:
        pytest.skip("triton is not installed")
    # tensors beyond the kernels' 32-bit offsets go to torch under auto
    monkeypatch.setattr(dispatch, "triton_supports", lambda u: True)
    shared_bc = SimpleNamespace(dim=lambda: 3)
    length = 4 * 2 ** 20
    wide = SimpleNamespace(is_cuda=True, shape=(1, 1024, length))
    narrow = SimpleNamespace(is_cuda=True, shape=(1, 64, length))
    assert tk.largest_index(1, 1024, 1, 16, length) > tk.MAX_INDEX >= tk.largest_index(1, 64, 1, 16, length)
    assert not dispatch._triton_takes(wide, torch.zeros(1024, 16), shared_bc)
    assert dispatch._triton_takes(narrow, torch.zeros(64, 16), shared_bc)
    short = tk._launch_shape(2, 64, 1, 16, 16384, "parallel")
    assert short["layout"] == "parallel" and short["n_chunks"] == 16384 // short["chunk"]
    longest = short["chunk"] * tk.MAX_GRID_CHUNKS
    assert tk._launch_shape(2, 64, 1, 16, longest, "parallel")["layout"] == "parallel"
    beyond = tk._launch_shape(2, 64, 1, 16, longest + 1, "parallel")
    # one program per channel block walks all chunks: no grid dimension counts chunks
    assert beyond["layout"] == "sequential" and beyond["n_blocks"] <= tk.MAX_GRID_CHUNKS


def test_auto_skips_a_fast_backend_that_imports_but_fails_where_it_runs(monkeypatch):
    """CPU tensors stand in for a GPU's: the probe runs whatever implementation the backend names."""
    from nnunet_logmamba.ssm.reference import selective_scan_reference

    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_PROBES", {})
    dispatch._warn_once.cache_clear()
    calls = []

    def no_kernel_image(*args, **kwargs):
        calls.append("mamba_ssm")
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    def wrong_result(u, delta, A, B, C, **kwargs):
        calls.append("triton")
        return selective_scan_reference(u, delta, A, B, C, **kwargs) * 1.5

    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "mamba_ssm", no_kernel_image)
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "triton", wrong_result)
    monkeypatch.setattr(dispatch, "kernel_supports", lambda u, A: True)
    monkeypatch.setattr(dispatch, "_triton_takes", lambda u, A, B=None: True)
    u, A = torch.randn(1, 4, 9), -torch.rand(4, 3)
    with pytest.warns(RuntimeWarning) as caught:
        with torch.inference_mode():   # as in a prediction: the probe still runs its backward
            chosen = dispatch.resolve_backend("auto", u, A)
    messages = " ".join(str(w.message) for w in caught)
    assert "no kernel image" in messages and "differs from the reference" in messages
    assert chosen == ("cpu_kernel" if dispatch.cpu_kernel_supports(u) else "torch")
    # probed once per device and dtype
    assert dispatch.resolve_backend("auto", u, A) == chosen and calls == ["mamba_ssm", "triton"]
    # an explicit choice is the user's: not probed, its own error
    with pytest.raises(RuntimeError, match="no kernel image"):
        selective_scan(u, u, A, torch.randn(1, 3, 9), torch.randn(1, 3, 9), backend="mamba_ssm")
    # doctor's reason names the failure
    gpu = SimpleNamespace(is_cuda=True, device=torch.device("cpu"), dtype=torch.float32)
    reason = dispatch.auto_backend_reason(gpu, A)
    assert "imports but fails here: RuntimeError: CUDA error: no kernel image" in reason and "runs here" in reason
    # a backend that matches the reference passes its probe and is chosen
    monkeypatch.setattr(dispatch, "_PROBES", {})
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "mamba_ssm", selective_scan_reference)
    assert dispatch.resolve_backend("auto", u.half(), A) == "mamba_ssm"
    assert dispatch.auto_backend_reason(SimpleNamespace(is_cuda=True, device=torch.device("cpu"),
                                                        dtype=torch.float16), A) == \
        "mamba-ssm's CUDA kernel imports and runs"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 7, 130, 1404, 4099])   # 1404: rows aligned through ALIGN = 4
@pytest.mark.parametrize("layout", ["parallel", "parallel_capped", "sequential", "sequential_wide"])
def test_cuda_triton_matches_the_torch_backend(length, dtype, layout, monkeypatch):
    import nnunet_logmamba.ssm.triton_kernel as tk
    monkeypatch.setattr(tk, "LAYOUT", layout.split("_")[0])
    if layout == "sequential_wide":  # 3 channels per group in blocks of 4: masked channels, compiled
        monkeypatch.setattr(tk, "SEQUENTIAL_PROGRAMS", 1)
    if layout == "parallel_capped":  # the gradient kernel compiled under a register cap (spills, same results)
        monkeypatch.setattr(tk, "GRADIENT_REGISTERS", 128)
    with_last = length != 130  # and once without: the backward without a last-state gradient
    g = torch.Generator().manual_seed(length)
    r = lambda *s: torch.randn(*s, generator=g).cuda()  # noqa: E731
    inputs = [r(2, 6, length).to(dtype), (0.5 * r(2, 6, length)).to(dtype), -(r(6, 16).abs() + 0.2),
              r(2, 2, 16, length).to(dtype), r(2, 2, 16, length).to(dtype), r(6), r(2, 6, length).to(dtype), r(6)]
    found = []
    for backend in ("triton", "torch"):
        xs = [t.clone().requires_grad_() for t in inputs]
        out = selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True,
                             return_last_state=with_last, backend=backend)
        y, last = out if with_last else (out, None)
        (y.float().square().mean() + (last.mean() if with_last else 0)).backward()
        found.append([y.float()] + ([last] if with_last else []) + [x.grad.float() for x in xs])
    # relative to each tensor's scale, with an absolute floor: at length 1 dA is exactly 0 in the torch backend
    # and ~1e-11 here (GPU FMA contraction), which a purely relative error would call 100 % wrong
    tolerance, floor = (1e-3, 1e-6) if dtype == torch.float32 else (3e-2, 1e-4)
    for a, b in zip(*found):
        a, b = a.detach(), b.detach()
        assert float((a - b).abs().max()) <= tolerance * float(b.abs().max()) + floor


COMPILER = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import nnunet_logmamba.ssm.triton_kernel as tk
    from triton_resources import kernel_resources, resources
    rows = resources("default", 2, 64, 2, 16, 16384, 90) + resources("seq128x2048x16", 2, 64, 2, 16, 16384, 90)
    # the other flag combinations of the sequential backward: no D, no z, no bias, a last-state gradient
    sizes = dict(T=64, BLOCK_D=1, BLOCK_N=16, ALIGN=1, HAS_D=False, HAS_Z=False, HAS_BIAS=False, SOFTPLUS=False,
                 HAS_INIT=True)
    rows.append({"layout": "sequential", "kernel": "backward, bare, last state",
                 **kernel_resources(tk._sequential_backward_kernel, sizes, dict(length=7, dim=3), 4, 90)})
    # the default sizes with the backward gradient kernel's register cap (bench_scan's 64x4096r128)
    capped = [r for r in resources("64x4096r128", 2, 64, 2, 16, 16384, 90) if r["kernel"] == "backward gradient"]
    rows += [{**r, "kernel": "backward gradient, 128 registers"} for r in capped]
    # a length divisible by 4 but not by 16 (LoG-VMamba's second stage on the hippocampus plans)
    rows += [{**r, "kernel": "backward gradient, length 1404"}
             for r in resources("64x4096", 1, 216, 1, 16, 1404, 90) if r["kernel"] == "backward gradient"]
    print(json.dumps(rows))
''')


@pytest.mark.slow
def test_triton_kernels_compile_for_a_gpu_without_one():
    """Both layouts compile to sm_90 machine code here, with and without their optional inputs (the
    interpreter never compiles: a kernel that only runs there could still fail on a GPU), the default
    layout and sizes keep every kernel free of register spills, and the chunk summaries cost less than a
    scan of the chunk (benchmarks/triton_resources.py measures them)."""
    pytest.importorskip("triton")
    from pathlib import Path
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILER, str(benchmarks)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["layout"], r["kernel"]) for r in rows] == [
        ("parallel", "forward summary"), ("parallel", "forward output"), ("parallel", "backward summary"),
        ("parallel", "backward gradient"), ("sequential", "forward"), ("sequential", "backward"),
        ("sequential", "backward, bare, last state"), ("parallel", "backward gradient, 128 registers"),
        ("parallel", "backward gradient, length 1404")]
    capped = rows[-2]
    for r in rows:
        assert r["instructions"] > r["mufu"] > 0, r   # exponentials at least: the machine code was read
        if r is capped:
            continue
        # no spills in the default layout at the default sizes; the sequential layout's loop over its chunks
        # is software-pipelined (the next chunk's loads in flight during this one's arithmetic), which costs
        # registers: a few bytes of stack are allowed there
        assert r["stack_bytes"] <= (0 if r["layout"] == "parallel" else 16), r
        assert 0 < r["registers"] < 255 and r["warps_per_sm"] >= 8, r
    # the register cap is applied: two 8-warp programs per multiprocessor instead of one, for a few bytes of spill
    assert capped["registers"] <= 128 and capped["warps_per_sm"] >= 16 and capped["stack_bytes"] <= 32, capped
    assert rows[3]["warps_per_sm"] < capped["warps_per_sm"], (rows[3], capped)
    # The (channels, state, steps) scans run 4 steps per thread and within one warp: B and C are loaded as
    # (channels, state, steps) tiles along the steps, and the arithmetic takes their layout (a broadcast
    # (state, steps) tile put one step per lane and the chunk across 2 warps: 1x32x2, 2-3.5x the shuffles).
    # Also at length 1404, whose rows the kernels know to be 16-byte aligned from ALIGN (Triton itself only marks
    # lengths divisible by 16). Not at length 7 (the bare kernel): rows that are not aligned cannot be loaded 4
    # steps at a time, and those scans keep one step per lane (same results, as the interpreter and CUDA tests
    # check).
    for r in rows:
        if r["kernel"] not in ("forward summary", "backward summary", "backward, bare, last state"):
            assert r["scans"] and all(int(s.split("x")[0]) >= 4 and s.endswith("x1") for s in r["scans"]), r
    work = {r["kernel"]: r["instructions"] for r in rows if r["layout"] == "parallel"}
    # the chunk summaries are sums over time, not scans of (channels, state, steps) pairs
    assert work["forward summary"] < work["forward output"] and work["backward summary"] < work["forward output"]
    assert work["backward gradient"] < 2000, work   # 2487 with the broadcast layout
