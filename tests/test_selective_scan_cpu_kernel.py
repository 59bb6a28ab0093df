"""The compiled CPU kernel (``cpu_kernel`` backend) against the sequential reference, and its fallbacks."""
import itertools
import os

import pytest
import torch

from nnunet_logmamba.ssm import cpu_kernel, dispatch, resolve_backend, selective_scan
from test_selective_scan import OPTION_SETS, assert_close_rel, check_against_reference, make_inputs, run

# A machine with a C compiler must build the kernel (CI has one): only its absence skips.
needs_kernel = pytest.mark.skipif(cpu_kernel.find_compiler() is None, reason="no C compiler on this machine")


@needs_kernel
def test_kernel_builds_where_a_compiler_exists():
    available, how = cpu_kernel.cpu_kernel_status()
    assert available, how


@needs_kernel
@pytest.mark.parametrize(
    "length,groups,dtype,option_name",
    # 1031 crosses many of the kernel's 64-position chunks; 130 ends inside one
    list(itertools.product([1, 7, 130, 1031], [None, 2], [torch.float32, torch.bfloat16], list(OPTION_SETS))),
)
def test_cpu_kernel_matches_reference(length, groups, dtype, option_name):
    check_against_reference("cpu_kernel", length, groups, dtype, option_name, last_dtype=torch.float32)


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_work_and_sum_the_shared_gradients(threads):
    """With several threads, dB/dC/dA/dD are summed from per-thread buffers: same result as one thread."""
    options = OPTION_SETS["all"]
    inputs = make_inputs(3, 6, 5, 200, 2, torch.float32, options, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, last1, grads1 = run("cpu_kernel", inputs, options)
        torch.set_num_threads(threads)
        y2, last2, grads2 = run("cpu_kernel", inputs, options)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last1, last2, rtol=1e-6, atol=1e-6)
    for name in grads1:
        assert_close_rel(grads2[name], grads1[name], 1e-5, f"d{name}")


@needs_kernel
def test_state_of_size_sixteen_and_odd_dims_over_long_sequences():
    """The LoG-VMamba shape family (state 16, many channels) and an odd channel count."""
    options = OPTION_SETS["bias_softplus"]
    inputs = make_inputs(2, 9, 16, 700, None, torch.float32, options, seed=2)
    y, _, grads = run("cpu_kernel", inputs, options)
    y_ref, _, grads_ref = run("reference", inputs, options, upcast=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=6e-4, atol=2e-3)
    for name in grads:
        assert_close_rel(grads[name], grads_ref[name], 2e-4, f"d{name}")


@needs_kernel
def test_auto_takes_the_kernel_for_float_cpu_tensors_and_torch_for_fp64(monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    A = torch.zeros(1, 1)
    assert resolve_backend("auto", torch.zeros(1, 1, 1), A) == "cpu_kernel"
    assert resolve_backend("auto", torch.zeros(1, 1, 1, dtype=torch.bfloat16), A) == "cpu_kernel"
    assert resolve_backend("auto", torch.zeros(1, 1, 1, dtype=torch.float64), A) == "torch"
    assert "compiled C kernel" in dispatch.auto_backend_reason(torch.zeros(1, 1, 1), A)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert resolve_backend("auto", torch.zeros(1, 1, 1), A) == "torch"


@needs_kernel
def test_fp64_is_refused_with_the_fix():
    inputs = make_inputs(1, 2, 2, 5, None, torch.float64, OPTION_SETS["plain"])
    with pytest.raises(ValueError, match="backend='torch' for fp64"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="cpu_kernel")


@needs_kernel
def test_loading_the_kernel_keeps_denormals():
    """-ffast-math only at compile time: loading the library must not switch the process to flush-to-zero."""
    assert cpu_kernel.cpu_kernel_status()[0]
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny / 10).item() > 0


def test_without_a_compiler_auto_falls_back_to_torch_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "find_compiler", lambda: None)
    monkeypatch.setenv("BIOIMAGE_MAMBA_CACHE", str(tmp_path))
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    cpu_kernel._load.cache_clear()
    try:
        available, why = cpu_kernel.cpu_kernel_status()
        assert not available and "no C compiler" in why
        u, A = torch.zeros(1, 1, 1), torch.zeros(1, 1)
        assert resolve_backend("auto", u, A) == "torch"
        assert "C kernel is unavailable: no C compiler" in dispatch.auto_backend_reason(u, A)
        assert "cpu_kernel" not in dispatch.available_backends("cpu")
        inputs = make_inputs(1, 2, 2, 5, None, torch.float32, OPTION_SETS["plain"])
        with pytest.raises(RuntimeError, match="use backend='torch'"):
            selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="cpu_kernel")
    finally:
        cpu_kernel._load.cache_clear()


@needs_kernel
def test_a_failing_compiler_falls_back_with_its_error(monkeypatch, tmp_path):
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'fatal: broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cpu_kernel, "find_compiler", lambda: str(fake))
    monkeypatch.setenv("BIOIMAGE_MAMBA_CACHE", str(tmp_path / "cache"))
    cpu_kernel._load.cache_clear()
    try:
        available, why = cpu_kernel.cpu_kernel_status()
        assert not available and "broken compiler" in why
        assert not list((tmp_path / "cache").glob("*.so")), "a failed build must leave no library behind"
    finally:
        cpu_kernel._load.cache_clear()


@needs_kernel
def test_a_cache_that_cannot_take_the_library_falls_back_to_the_temporary_folder(monkeypatch, tmp_path):
    import errno
    import tempfile

    cache, temporary = tmp_path / "cache", tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("BIOIMAGE_MAMBA_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    replace = os.replace

    def refused_in_cache(src, dst):   # as a full or foreign file system answers
        if str(dst).startswith(str(cache)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(cpu_kernel.os, "replace", refused_in_cache)
    cpu_kernel._load.cache_clear()
    try:
        available, how = cpu_kernel.cpu_kernel_status()
        assert available and str(temporary / "bioimage_mamba") in how, how
        assert not list(cache.iterdir()), "no partial library may stay in the cache"
    finally:
        cpu_kernel._load.cache_clear()


@needs_kernel
def test_the_built_kernel_is_cached_for_later_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("BIOIMAGE_MAMBA_CACHE", str(tmp_path))
    cpu_kernel._load.cache_clear()
    try:
        available, how = cpu_kernel.cpu_kernel_status()
        assert available and how.startswith("built with")
        assert len(list(tmp_path.glob("cpu_scan-*.so"))) == 1
        cpu_kernel._load.cache_clear()
        available, how = cpu_kernel.cpu_kernel_status()
        assert available and how.startswith("loaded from")
    finally:
        cpu_kernel._load.cache_clear()


def _kernel_matches_reference(inputs, options, threads, stored=None):
    """The kernel on ``stored`` (default: ``inputs``) with ``threads`` threads against the fp64 reference on
    ``inputs``: output, last state, every gradient. Returns the kernel's output."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y, last, grads = run("cpu_kernel", inputs if stored is None else stored, options)
    finally:
        torch.set_num_threads(before)
    y_ref, last_ref, grads_ref = run("reference", inputs, options, upcast=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last.double(), last_ref, rtol=6e-4, atol=2e-3)
    for name in grads:
        assert_close_rel(grads[name], grads_ref[name], 2e-4, f"d{name}")
    return y


@needs_kernel
@pytest.mark.parametrize("groups", [None, 2, 130])
@pytest.mark.parametrize("threads", [1, 3])
def test_channel_blocks_that_share_B_and_C_sum_their_gradients(groups, threads):
    """The kernel scans the channels of a group in blocks (at most 64, more blocks when threads need work)
    that read B, C and add dB, dC once per position: 130 channels make blocks of unequal width (44, 44, 42
    with one group and one thread; 33 and 32 per group with 2 groups; one channel per group with 130)."""
    options = OPTION_SETS["all"]
    _kernel_matches_reference(make_inputs(2, 130, 16, 150, groups, torch.float32, options, seed=5), options, threads)


@needs_kernel
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_tokens_stored_channels_last_are_scanned_in_place(groups, threads):
    """u, delta, z as (batch, length, dim) memory viewed as (batch, dim, length) (tokens out of a linear
    layer): same results as the reference, and y comes back in that layout (no transposed copy after).
    70 channels: more than one block with one group, blocks of 35 with two."""
    options = OPTION_SETS["all"]
    inputs = make_inputs(2, 70, 16, 150, groups, torch.float32, options, seed=8)
    stored = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                  if k in ("u", "delta", "z") else v) for k, v in inputs.items()}
    assert cpu_kernel.is_channels_last(stored["u"]) and not cpu_kernel.is_channels_last(inputs["u"])
    _kernel_matches_reference(inputs, options, threads, stored)
    plain = selective_scan(stored["u"], stored["delta"], stored["A"], stored["B"], stored["C"], backend="cpu_kernel")
    assert cpu_kernel.is_channels_last(plain)


@needs_kernel
def test_no_channels_is_an_empty_scan_not_a_crash():
    u = torch.zeros(1, 0, 5, requires_grad=True)
    y = selective_scan(u, torch.zeros(1, 0, 5), torch.zeros(0, 4), torch.zeros(1, 4, 5), torch.zeros(1, 4, 5),
                       backend="cpu_kernel")
    assert y.shape == (1, 0, 5)
    y.sum().backward()
    assert u.grad.shape == (1, 0, 5)


def test_a_backend_forced_for_another_device_is_overridden_where_it_cannot_run(monkeypatch):
    # one environment for GPU training and CPU prediction: BIOIMAGE_MAMBA_SCAN_BACKEND=mamba_ssm
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u, A = torch.zeros(1, 1, 1), torch.zeros(1, 1)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    automatic = resolve_backend("auto", u, A)
    for forced in ("mamba_ssm", "triton"):
        monkeypatch.setenv(dispatch.BACKEND_ENV, forced)
        with pytest.warns(RuntimeWarning, match=f"{forced} cannot run on cpu"):
            dispatch._warn_once.cache_clear()
            assert resolve_backend("auto", u, A) == automatic
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")      # one that runs here is obeyed
    assert resolve_backend("auto", u, A) == "torch"
    assert resolve_backend("reference", u, A) == "reference"   # an explicit argument is never overridden
