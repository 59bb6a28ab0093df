"""The fast selective-scan backends against the sequential reference: forward and every gradient."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nnunet_logmamba.ssm import (available_backends, mamba_ssm_status, resolve_backend, selective_scan,
                                 selective_scan_reference)
from nnunet_logmamba.ssm import chunked
from nnunet_logmamba.ssm.workspace import Workspace

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OPTION_SETS = {
    "plain": dict(z=False, bias=False, softplus=False, last=False),
    "all": dict(z=True, bias=True, softplus=True, last=True),
    "gate": dict(z=True, bias=False, softplus=False, last=False),
    "bias_softplus": dict(z=False, bias=True, softplus=True, last=False),
    "last_state": dict(z=False, bias=False, softplus=True, last=True),
}
# mamba-ssm's own test tolerances for the forward pass (tests/ops/test_selective_scan.py)
FORWARD_TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float64: (1e-10, 1e-10)}
# gradients compared as max|diff| / max|ref| per tensor
GRAD_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def make_inputs(batch, dim, state, length, groups, dtype, options, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    bshape = (batch, state, length) if groups is None else (batch, groups, state, length)
    inputs = {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5) + (0.0 if options["softplus"] else 1.0),
        "A": (-torch.rand(dim, state, generator=g, dtype=torch.float64) * 3 - 0.05).to(torch.float32
                                                                                    if dtype != torch.float64 else dtype),
        "B": rnd(*bshape),
        "C": rnd(*bshape),
        "D": rnd(dim).to(torch.float32 if dtype != torch.float64 else dtype),
        "z": rnd(batch, dim, length) if options["z"] else None,
        "delta_bias": (rnd(dim, scale=0.5).to(torch.float32 if dtype != torch.float64 else dtype)
                       if options["bias"] else None),
    }
    if not options["softplus"]:
        inputs["delta"] = inputs["delta"].abs()  # a decaying state needs delta >= 0 without softplus
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run(backend, inputs, options, upcast=False):
    ins = {k: (v.detach().double().requires_grad_() if upcast and v is not None else v) for k, v in inputs.items()}
    out = selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], D=ins["D"], z=ins["z"],
                         delta_bias=ins["delta_bias"], delta_softplus=options["softplus"],
                         return_last_state=options["last"], backend=backend)
    y, last = out if options["last"] else (out, None)
    # a loss that weights every output differently, so that a permuted gradient cannot pass
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    loss = (y.double() * weights).sum()
    if last is not None:
        loss = loss + (last.double() ** 2).sum() * 0.1
    tensors = [ins[n] for n in NAMES if ins[n] is not None]
    grads = torch.autograd.grad(loss, tensors)
    return y, last, dict(zip([n for n in NAMES if ins[n] is not None], grads))


def assert_close_rel(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item() / scale
    assert err <= tol, f"{what}: relative max error {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize(
    "length,groups,dtype,option_name",
    list(itertools.product([1, 7, 1031], [None, 2], [torch.float32, torch.bfloat16, torch.float64],
                           list(OPTION_SETS))),
)
def test_torch_backend_matches_reference(length, groups, dtype, option_name):
    check_against_reference("torch", length, groups, dtype, option_name)


def check_against_reference(backend, length, groups, dtype, option_name, last_dtype=None):
    """``backend`` against the fp64 reference on the same (already rounded) inputs: output, last state, every
    gradient (in its input's dtype). ``last_dtype``: the last state's dtype when it is not the output's."""
    options = OPTION_SETS[option_name]
    inputs = make_inputs(2, 4, 3, length, groups, dtype, options, seed=length)
    y, last, grads = run(backend, inputs, options)
    y_ref, last_ref, grads_ref = run("reference", inputs, options, upcast=True)
    assert y.dtype == dtype and y.shape == inputs["u"].shape
    rtol, atol = FORWARD_TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref.to(dtype).double(), rtol=rtol, atol=atol)
    if options["last"]:
        assert last.shape == (2, 4, 3) and (last_dtype is None or last.dtype == last_dtype)
        torch.testing.assert_close(last.double(), last_ref, rtol=rtol, atol=atol)
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_rel(grads[name], grads_ref[name], GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("keep", [True, False])
def test_segmented_path_matches_reference(monkeypatch, keep):
    """Long inputs are cut into segments, with or without keeping states for backward."""
    monkeypatch.setattr(chunked, "_SEGMENT_ELEMENTS", 2 * 6 * 4 * 300)   # -> segments of 300 positions
    monkeypatch.setattr(chunked, "_KEEP_ELEMENTS", 1 << 30 if keep else 0)
    options = OPTION_SETS["all"]
    inputs = make_inputs(2, 6, 4, 1301, 3, torch.float64, options, seed=3)
    y, last, grads = run("torch", inputs, options)
    y_ref, last_ref, grads_ref = run("reference", inputs, options)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    for name in grads:
        assert_close_rel(grads[name], grads_ref[name], 1e-10, f"d{name}")


def test_long_sequence_with_strong_decay_stays_finite():
    """Large delta*|A| (decay to ~0 within a step) over a long sequence: no overflow, no NaN."""
    options = OPTION_SETS["bias_softplus"]
    inputs = make_inputs(1, 4, 8, 20000, None, torch.float32, options, seed=5)
    with torch.no_grad():
        inputs["delta_bias"].fill_(6.0)          # softplus(6) ~ 6: exp(-6 * 3) per step
        inputs["A"].mul_(10)
    y, _, grads = run("torch", inputs, options)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    y_ref, _, _ = run("reference", inputs, options, upcast=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=6e-4, atol=2e-3)


def test_scan_runs_in_fp32_under_autocast():
    options = OPTION_SETS["all"]
    inputs = make_inputs(2, 8, 4, 64, None, torch.float32, options)
    expected = selective_scan(*[inputs[n] for n in ("u", "delta", "A", "B", "C")], D=inputs["D"], z=inputs["z"],
                              delta_bias=inputs["delta_bias"], delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan(*[inputs[n] for n in ("u", "delta", "A", "B", "C")], D=inputs["D"], z=inputs["z"],
                             delta_bias=inputs["delta_bias"], delta_softplus=True, backend="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_workspace_reuse_never_aliases_results():
    """Buffers go back to the pool after a call: earlier outputs and last states must stay intact."""
    options = OPTION_SETS["last_state"]
    first = make_inputs(2, 8, 4, 300, None, torch.float32, options, seed=1)
    second = make_inputs(2, 8, 4, 300, None, torch.float32, options, seed=2)
    y1, last1, _ = run("torch", first, options)
    y1_copy, last1_copy = y1.clone(), last1.clone()
    run("torch", second, options)
    run("torch", second, options)
    torch.testing.assert_close(y1, y1_copy, rtol=0, atol=0)
    torch.testing.assert_close(last1, last1_copy, rtol=0, atol=0)


def test_workspace_bounds_and_reuses_buffers():
    pool = Workspace(max_bytes=4 * 100)
    a = pool.take((10, 10), torch.float32, torch.device("cpu"))
    pool.give(a)
    b = pool.take((100,), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (100,)
    pool.give(b, torch.empty(50))            # the second one exceeds max_bytes: dropped
    assert pool.take((50,), torch.float32, torch.device("cpu")).data_ptr() != b.data_ptr()


@pytest.mark.parametrize("bad,message", [
    (dict(u=torch.zeros(2, 4)), "u must be"),
    (dict(delta=torch.zeros(2, 4, 9)), "delta must"),
    (dict(A=torch.zeros(5, 3)), "A must be"),
    (dict(B=torch.zeros(2, 3, 9)), "B must be"),
    (dict(C=torch.zeros(2, 3, 3, 8)), "C must be"),      # 3 groups do not divide dim 4
    (dict(D=torch.zeros(3)), "D must be"),
    (dict(z=torch.zeros(2, 4, 7)), "z must"),
    (dict(delta_bias=torch.zeros(4, 1)), "delta_bias must"),
])
def test_bad_shapes_name_the_argument(bad, message):
    args = dict(u=torch.zeros(2, 4, 8), delta=torch.zeros(2, 4, 8), A=-torch.ones(4, 3), B=torch.zeros(2, 3, 8),
                C=torch.zeros(2, 3, 8), D=None, z=None, delta_bias=None)
    args.update(bad)
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match=message):
            selective_scan(**args, backend=backend)


def test_backend_choice(monkeypatch):
    from nnunet_logmamba.ssm import cpu_kernel_status

    u, A = torch.zeros(1, 2, 3), torch.zeros(2, 4)
    # on CPU: the compiled kernel where it builds, else the torch scan
    assert resolve_backend("auto", u, A) == ("cpu_kernel" if cpu_kernel_status()[0] else "torch")
    assert resolve_backend("auto", u.double(), A.double()) == "torch"
    assert "torch" in available_backends("cpu") and "mamba_ssm" not in available_backends("cpu")
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        resolve_backend("cuda", u, A)
    monkeypatch.setenv("BIOIMAGE_MAMBA_SCAN_BACKEND", "reference")
    assert resolve_backend("auto", u, A) == "reference"
    assert resolve_backend("torch", u, A) == "torch"          # an explicit choice wins over the variable


def test_mamba_ssm_backend_on_cpu_is_a_clear_error():
    inputs = make_inputs(1, 2, 2, 5, None, torch.float32, OPTION_SETS["plain"])
    with pytest.raises(RuntimeError, match="mamba"):
        selective_scan(*[inputs[n] for n in ("u", "delta", "A", "B", "C")], backend="mamba_ssm")


def test_packages_import_when_mamba_ssm_is_broken(tmp_path):
    """mamba-ssm installed without its compiled extension raises on import: we must not."""
    fake = tmp_path / "mamba_ssm"
    fake.mkdir()
    (fake / "__init__.py").write_text("import selective_scan_cuda  # the compiled extension is missing\n")
    code = textwrap.dedent("""
        import torch, nnunet_logmamba, vemamba_iso
        from nnunet_logmamba.ssm import mamba_ssm_status, resolve_backend, selective_scan
        ok, reason = mamba_ssm_status()
        assert not ok and "selective_scan_cuda" in reason, reason
        u = torch.randn(1, 2, 5)
        assert resolve_backend("auto", u, torch.zeros(2, 3)) in ("torch", "cpu_kernel")
        y = selective_scan(u, u.abs(), -torch.ones(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
        print("OK", tuple(y.shape))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK (1, 2, 5)" in result.stdout


cuda_kernel = pytest.mark.skipif(not (torch.cuda.is_available() and mamba_ssm_status()[0]),
                                 reason="needs a CUDA GPU and mamba-ssm")


@cuda_kernel
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option_name", ["plain", "gate", "bias_softplus"])
@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_kernel_and_torch_backend_match_reference_on_gpu(dtype, option_name, groups):
    # without the last state: the kernel does not propagate gradients through it
    options = dict(OPTION_SETS[option_name], last=False)
    inputs = make_inputs(2, 8, 16, 1031, groups, dtype, options)
    inputs = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y_ref, _, grads_ref = run("reference", inputs, options, upcast=True)
    rtol, atol = FORWARD_TOL[dtype]
    for backend in ("mamba_ssm", "torch"):
        y, _, grads = run(backend, inputs, options)
        torch.testing.assert_close(y.double(), y_ref.to(dtype).double(), rtol=rtol, atol=atol)
        for name in grads:
            assert_close_rel(grads[name], grads_ref[name], max(GRAD_TOL[dtype], 1e-3), f"{backend} d{name}")
