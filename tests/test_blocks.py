"""LoG-VMamba blocks: token extractors, join orders, scan routes, the VSS block (2D and 3D)."""
import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_logmamba.blocks import (JOIN_ORDERS, GlobalTokenExtractor, LocalTokenExtractor, LoGVSSBlock,
                                    build_routes, global_compression, join_permutation, join_tokens,
                                    merge_routes, split_local, unfold_neighbourhood)
from nnunet_logmamba.blocks.layout import to_channels_first, to_channels_last


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shifted(x, offset):
    """x[..., p + offset] with zeros outside, computed independently of the code under test."""
    out = torch.zeros_like(x)
    src, dst = [slice(None), slice(None)], [slice(None), slice(None)]
    for o, n in zip(offset, x.shape[2:]):
        src.append(slice(max(o, 0), n + min(o, 0)))
        dst.append(slice(max(-o, 0), n - max(o, 0)))
    out[tuple(dst)] = x[tuple(src)]
    return out


@pytest.mark.parametrize("shape", [(3, 5, 11), (2, 32, 70, 60), (2, 6, 4, 70, 30), (1, 4, 5, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layout_copies_are_the_permuted_maps_and_their_gradients(shape, dtype):
    # (2, 32, 70, 60) and (2, 6, 4, 70, 30) are large enough for ATen's blocked transpose copy, the others not
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    last = to_channels_last(x)
    assert last.is_contiguous() and last.dtype == dtype
    assert torch.equal(last, x.detach().movedim(1, -1))
    weights = torch.randn(last.shape, dtype=dtype)
    (grad,) = torch.autograd.grad((last * weights).sum(), x)
    assert grad.is_contiguous() and torch.equal(grad, weights.movedim(-1, 1))

    y = torch.randn(shape[:1] + shape[2:] + shape[1:2], dtype=dtype, requires_grad=True)
    first = to_channels_first(y)
    assert first.is_contiguous() and torch.equal(first, y.detach().movedim(-1, 1))
    weights = torch.randn(first.shape, dtype=dtype)
    (grad,) = torch.autograd.grad((first * weights).sum(), y)
    assert grad.is_contiguous() and torch.equal(grad, weights.movedim(1, -1))
    assert torch.equal(to_channels_first(to_channels_last(x)), x)


def test_layout_copies_take_non_contiguous_inputs_and_reject_maps_without_spatial_axes():
    x = torch.randn(2, 40, 3, 50).transpose(1, 3)  # (2, 50, 3, 40), not contiguous
    assert torch.equal(to_channels_last(x), x.movedim(1, -1))
    assert torch.equal(to_channels_first(x), x.movedim(-1, 1))
    # off the CPU the permuted view itself (no copy), as the blocks used before
    meta = torch.empty(2, 3, 4, 5, device="meta")
    assert to_channels_last(meta).shape == (2, 4, 5, 3) and not to_channels_last(meta).is_contiguous()
    assert to_channels_first(meta).shape == (2, 5, 3, 4) and not to_channels_first(meta).is_contiguous()
    with pytest.raises(ValueError, match="batch, channels"):
        to_channels_last(torch.randn(4, 3))
    with pytest.raises(ValueError, match="channels"):
        to_channels_first(torch.randn(4))


@pytest.mark.parametrize("spatial", [(5, 7), (4, 6, 5)])
def test_unfold_neighbours_are_shifted_inputs(spatial):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *spatial)
    k = 3
    out = unfold_neighbourhood(x, k)
    nbh = k ** len(spatial)
    assert out.shape == (2, 3 * nbh, *spatial)
    for c in range(3):
        for j, offset in enumerate(itertools.product(range(-1, 2), repeat=len(spatial))):
            torch.testing.assert_close(out[:, c * nbh + j], _shifted(x, offset)[:, c], rtol=0, atol=0)


@pytest.mark.parametrize("spatial,k", [((9,), 3), ((5, 6), 3), ((4, 5, 3), 3), ((5, 4, 3), 5), ((4, 5), 1)])
def test_unfold_gradient_is_the_sum_of_shifted_gradients(spatial, k):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *spatial, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unfold_neighbourhood(t, k), (x,))
    # against autograd of the same neighbourhoods taken with F.pad and slicing (independent of the
    # custom backward); F.unfold only covers 2D
    weights = torch.randn(2, 2 * k ** len(spatial), *spatial, dtype=torch.double)
    got, = torch.autograd.grad((unfold_neighbourhood(x, k) * weights).sum(), x)
    half = k // 2
    padded = F.pad(x, [half] * (2 * len(spatial)))
    expected_out = torch.stack([padded[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, spatial))]
                                for off in itertools.product(range(k), repeat=len(spatial))], dim=2).flatten(1, 2)
    want, = torch.autograd.grad((expected_out * weights).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    out = unfold_neighbourhood(x, k)
    assert out.data_ptr() != x.data_ptr()  # a new tensor, also when k == 1
    assert out.movedim(1, -1).is_contiguous()  # stored channels last
    (out * 2).sum().backward()
    doubled = unfold_neighbourhood(x, k).mul_(2)  # callers may modify it in place
    torch.testing.assert_close(doubled, 2 * out)


@pytest.mark.parametrize("channels,squeeze,ndim", [(32, 16, 3), (16, 16, 3), (12, 4, 2), (6, 3, 1), (5, 2, 3)])
def test_squeeze_as_one_linear_layer_is_the_grouped_conv(channels, squeeze, ndim):
    torch.manual_seed(0)
    ltx = LocalTokenExtractor(channels, ndim, squeeze=squeeze).double()
    x = torch.randn(2, channels, *([5] * ndim), dtype=torch.double, requires_grad=True)
    expected = F.silu(ltx.squeeze(x))  # the grouped 1x1 conv as torch computes it
    got = ltx.squeezed(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    weights = torch.randn_like(expected)
    params = [x, ltx.squeeze.weight, ltx.squeeze.bias]
    for g, e in zip(torch.autograd.grad((got * weights).sum(), params),
                    torch.autograd.grad((expected * weights).sum(), params)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spatial,squeeze", [((6, 5), 8), ((3, 4, 5), 16)])
def test_local_token_extractor_neighbours_of_squeezed_map(spatial, squeeze):
    torch.manual_seed(0)
    ltx = LocalTokenExtractor(32, len(spatial), squeeze=squeeze)
    x = torch.randn(2, 32, *spatial)
    out = ltx(x)
    squeezed = F.silu(ltx.squeeze(x))
    assert squeezed.shape[1] == 32 // squeeze
    assert ltx.out_channels == (32 // squeeze) * 3 ** len(spatial) == out.shape[1]
    centre = (3 ** len(spatial)) // 2  # offset (0, .., 0) in row-major order
    torch.testing.assert_close(out[:, centre::3 ** len(spatial)], squeezed)
    # the unfold is fixed: the squeeze conv is the only trainable part
    assert {n for n, _ in ltx.named_parameters()} == {"squeeze.weight", "squeeze.bias"}


@pytest.mark.parametrize("join", JOIN_ORDERS)
@pytest.mark.parametrize("num_local,num_global", [(1, 1), (10, 0), (10, 3), (12, 4), (7, 9), (100, 5)])
def test_join_orders_round_trip(join, num_local, num_global):
    torch.manual_seed(0)
    local = torch.randn(2, 3, num_local)
    glob = torch.randn(2, 3, num_global)
    joined = join_tokens(local, glob, join)
    assert joined.shape == (2, 3, num_local + num_global)
    torch.testing.assert_close(split_local(joined, num_global, join), local, rtol=0, atol=0)
    # every global token is in the sequence exactly once
    order = join_permutation(num_local, num_global, join)
    assert sorted(order) == list(range(num_local + num_global))


def test_join_order_positions():
    # 10 local (0..9), 3 global (10..12)
    assert join_permutation(10, 3, "head")[:3] == [10, 11, 12]
    assert join_permutation(10, 3, "middle")[5:8] == [10, 11, 12]
    split = join_permutation(10, 3, "split")
    assert split[:2] == [10, 11] and split[-1] == 12
    inter = join_permutation(10, 3, "interleaved")
    assert [inter.index(g) for g in (10, 11, 12)] == [0, 4, 8]  # every 3 local tokens, remainder last
    # more global tokens than local ones: the excess goes to the head
    assert join_permutation(2, 4, "interleaved") == [2, 3, 4, 0, 5, 1]


def test_join_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown join order"):
        join_permutation(4, 2, "tail")
    with pytest.raises(ValueError, match="must agree"):
        join_tokens(torch.zeros(2, 3, 4), torch.zeros(2, 5, 1))


@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("spatial", [(3, 5), (2, 3, 4)])
def test_scan_routes_round_trip(directions, spatial):
    torch.manual_seed(0)
    tokens = torch.randn(2, 4, *spatial)
    glob = torch.randn(2, 4, 3)
    routes = build_routes(tokens, glob, directions, "interleaved")
    length = torch.Size(spatial).numel()
    assert routes.shape == (2, directions, 4, length + 3)
    # the identity "scan" gives every local token back once per route
    merged = merge_routes(routes, spatial, 3, "interleaved")
    torch.testing.assert_close(merged, directions * tokens.flatten(2))
    if directions >= 2:
        torch.testing.assert_close(routes[:, 1], routes[:, 0].flip(-1))
    if directions == 4:
        # route 2 walks the last spatial axis slowest
        transposed = tokens.permute(0, 1, *range(tokens.dim() - 1, 1, -1)).flatten(2)
        torch.testing.assert_close(split_local(routes[:, 2], 3, "interleaved"), transposed)


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)])
def test_one_route_of_local_tokens_reaches_the_scan_and_comes_back_without_a_copy(spatial):
    """The LTX tokens are unfolded channels last and a single route without global tokens is a view of them,
    stored (batch, length, route, channels): the scan reads them in place, and its output, stored the same
    way, is merged back without a copy (on the full-size nnU-Net maps those copies cost as much as the
    scan's projections)."""
    squeezed = torch.randn(2, 2, *spatial)
    tokens = unfold_neighbourhood(squeezed, 3)
    assert tokens.movedim(1, -1).is_contiguous()
    routes = build_routes(tokens, None, 1, "interleaved")
    assert routes.data_ptr() == tokens.data_ptr() and routes.permute(0, 3, 1, 2).is_contiguous()
    merged = merge_routes(routes, spatial, 0, "interleaved")
    assert merged.data_ptr() == tokens.data_ptr()
    torch.testing.assert_close(merged, tokens.flatten(2))
    # with global tokens and 2 routes the layout is the same (joined and stacked once)
    glob = torch.randn(2, tokens.shape[1], 3)
    routes = build_routes(tokens, glob, 2, "split")
    assert routes.permute(0, 3, 1, 2).is_contiguous()
    torch.testing.assert_close(merge_routes(routes, spatial, 3, "split"), 2 * tokens.flatten(2))


def test_join_along_another_axis_keeps_the_layout():
    local, glob = torch.randn(2, 7, 4), torch.randn(2, 3, 4)
    joined = join_tokens(local, glob, "interleaved", dim=-2)
    torch.testing.assert_close(joined, join_tokens(local.transpose(1, 2), glob.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(split_local(joined, 3, "interleaved", dim=-2), local)
    with pytest.raises(ValueError, match="token axis"):
        join_tokens(local, torch.randn(2, 3, 5), dim=-2)


def test_global_compression_is_derived_from_the_size():
    assert global_compression((40, 56, 40)) == ((10, 14, 10), (4, 4, 4))
    assert global_compression((5, 28, 3)) == ((2, 7, 1), (3, 4, 3))
    with pytest.raises(ValueError, match="positive"):
        global_compression((0, 4))


@pytest.mark.parametrize("spatial", [(9, 14), (5, 12, 7)])
def test_global_tokens_see_the_whole_field_of_view(spatial):
    torch.manual_seed(0)
    gtx = GlobalTokenExtractor(2, spatial, num_tokens=3, token_channels=2 * 9)
    x = torch.randn(1, 2, *spatial, requires_grad=True)
    tokens = gtx(x)
    assert tokens.shape == (1, 18, 3)
    # one token of one channel group depends on every position of that channel
    tokens[0, 0, 0].backward()
    assert (x.grad[0, 0] != 0).all()
    assert (x.grad[0, 1] == 0).all()  # depthwise: other channel groups are independent
    with pytest.raises(ValueError, match="spatial size"):
        gtx(torch.randn(1, 2, *[s + 1 for s in spatial]))
    with pytest.raises(ValueError, match="multiple of channels"):
        GlobalTokenExtractor(4, spatial, token_channels=6)


@pytest.mark.parametrize("mode", ["local", "global", "local_global"])
@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("spatial", [(6, 10), (4, 6, 5)])
def test_block_forward_backward_every_parameter_gets_a_gradient(mode, directions, spatial):
    torch.manual_seed(0)
    block = LoGVSSBlock(16, spatial, mode=mode, directions=directions, squeeze=4)
    x = torch.randn(2, 16, *spatial, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, x, rtol=0, atol=0)  # a new block is the identity (zero out_proj)
    target = torch.randn_like(x)
    (y - target).square().mean().backward()
    # at step 0 only out_proj learns; one optimiser step opens the branch for everything before it
    assert block.out_proj.weight.grad.abs().sum() > 0
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    block.zero_grad()
    x.grad = None
    y = block(x)
    assert not torch.allclose(y, x)  # the residual branch contributes now
    (y - target).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def _local_block_written_out(block, x):
    """The 2D L-VMamba block (one route, no global tokens) computed step by step from its parameters, with
    torch's own unfold and the reference scan on contiguous (batch, channels, length) tensors: an independent
    check of the block's layouts (channels-last tokens, routes stored (batch, length, K, channels))."""
    from nnunet_logmamba.ssm import selective_scan

    batch, channels, height, width = x.shape
    h = block.in_proj(block.norm(x.permute(0, 2, 3, 1)))
    inner, gate = h.chunk(2, dim=-1)
    squeezed = F.silu(block.local_tokens.squeeze(inner.permute(0, 3, 1, 2)))
    tokens = F.unfold(squeezed, 3, padding=1)  # (batch, squeezed * 9, length), channel c * 9 + offset
    projected = torch.einsum("cd,bdl->bcl", block.x_proj_weight[0], tokens)
    dts, b, c = projected.split([block.dt_rank, block.state_size, block.state_size], dim=1)
    dts = torch.einsum("dr,brl->bdl", block.dt_proj_weight[0], dts)
    y = selective_scan(tokens.contiguous(), dts.contiguous(), -torch.exp(block.A_log), b.contiguous(), c.contiguous(),
                       D=block.D, delta_bias=block.dt_bias.flatten(), delta_softplus=True, backend="reference")
    y = y.transpose(1, 2).reshape(batch, height, width, -1)
    y = block.out_norm(block.back_proj(y)) * F.silu(gate)
    return x + block.out_proj(y).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", ["cpu_kernel", "torch", "reference"])
def test_local_block_matches_its_computation_written_out(backend):
    from nnunet_logmamba.ssm import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    block = LoGVSSBlock(16, (7, 9), mode="local", squeeze=4, zero_init_residual=False, scan_backend=backend)
    x = torch.randn(2, 16, 7, 9, requires_grad=True)
    y = block(x)
    expected = _local_block_written_out(block, x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, *block.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *block.parameters()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["local", "global", "local_global"])
@pytest.mark.parametrize("spatial", [(6, 10), (4, 6, 5)])
def test_recomputed_block_equals_the_stored_one(mode, spatial):
    import copy

    torch.manual_seed(0)
    stored = LoGVSSBlock(16, spatial, mode=mode, squeeze=4, zero_init_residual=False, drop_path=0.2)
    positions = math.prod(spatial)
    recomputed = copy.deepcopy(stored)
    recomputed.recompute_tokens = 2 * positions  # chunks of 2 samples: 2, 2 and 1 of a batch of 5
    x = torch.randn(5, 16, *spatial, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y = stored(x)
    torch.manual_seed(1)  # the same drop-path draw
    y2 = recomputed(x2)
    # equal up to the rounding of matrix products over fewer samples at once
    torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y2 * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for (name, p), p2 in zip(stored.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # in training, the branch keeps no activations: only the block's input, the drop-path factors and the
    # parameters are saved; the branch runs on chunks of 2, 2 and 1 samples, in forward and again in backward
    def saved_shapes(block, inputs):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            block(inputs)
        return shapes

    parameters = sum(p.numel() for p in recomputed.parameters())
    assert sum(math.prod(s) for s in saved_shapes(recomputed, x2)) == x2.numel() + x2.shape[0] + parameters
    branch_inputs = []
    branch = recomputed._branch_channels_last
    recomputed._branch_channels_last = lambda chunk: branch_inputs.append(chunk.shape[0]) or branch(chunk)
    recomputed(x2).sum().backward()
    del recomputed._branch_channels_last
    assert branch_inputs == [2, 2, 1, 2, 2, 1]
    # in eval mode (grad on or off) the block runs its plain forward: the branch's activations are saved
    recomputed.eval()
    assert sum(math.prod(s) for s in saved_shapes(recomputed, x2)) > 3 * x2.numel()
    with torch.no_grad():
        stored.eval()
        torch.testing.assert_close(recomputed(x), stored(x), rtol=0, atol=0)


def test_recomputed_block_under_cpu_autocast():
    import copy

    torch.manual_seed(0)
    stored = LoGVSSBlock(16, (6, 10), mode="local_global", squeeze=4, zero_init_residual=False)
    recomputed = copy.deepcopy(stored)
    recomputed.recompute_tokens = 60
    x = torch.randn(3, 16, 6, 10)
    outputs, grads = [], []
    for block in (stored, recomputed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        outputs.append(y)
        grads.append(torch.autograd.grad(y.float().sum(), list(block.parameters())))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    # bf16 parameter gradients summed per chunk instead of over the batch: equal up to bf16 rounding
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item() + 1e-6)


def test_block_without_zero_init_contributes_at_once():
    torch.manual_seed(0)
    block = LoGVSSBlock(16, (6, 8), zero_init_residual=False, squeeze=4)
    assert block.out_proj.weight.abs().sum() > 0
    x = torch.randn(1, 16, 6, 8)
    assert not torch.allclose(block(x), x)


def test_block_sequence_order_matters_for_join_and_directions():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 6, 7)
    ref = LoGVSSBlock(16, (6, 7), join="interleaved", zero_init_residual=False)
    state = ref.state_dict()
    other = LoGVSSBlock(16, (6, 7), join="head", zero_init_residual=False)
    other.load_state_dict(state)
    assert not torch.allclose(ref(x), other(x))


def test_block_under_cpu_autocast_is_finite_and_keeps_dtype():
    torch.manual_seed(0)
    # a trained (non-zero) output projection, so that the branch really adds its bf16 result
    block = LoGVSSBlock(16, (6, 8), mode="local_global", squeeze=4, zero_init_residual=False)
    x = torch.randn(2, 16, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.float32                      # the residual sum keeps the fp32 map's dtype
    assert torch.isfinite(y).all() and (y - x).abs().max() > 1e-3
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="both"), "token mode"),
    (dict(join="tail"), "join order"),
    (dict(directions=3), "directions"),
    (dict(kernel_size=4), "odd"),
    (dict(state_size=0), "positive"),
    (dict(recompute_tokens=0), "recompute_tokens"),
])
def test_block_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoGVSSBlock(16, (6, 8), **kwargs)


def test_block_rejects_inputs_of_another_size():
    block = LoGVSSBlock(8, (6, 8), mode="local")
    with pytest.raises(ValueError, match="spatial size"):
        block(torch.randn(1, 8, 6, 9))
