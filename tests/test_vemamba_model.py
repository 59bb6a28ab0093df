"""VEMamba network: shapes for every factor, scan orders, DWAM, VDIM, MoCo encoder."""
import numpy as np
import pytest
import torch

from vemamba_iso.evaluation.baselines import interpolate_axial
from vemamba_iso.model import (FAMILY_ORDERS, ORDER_AXES, DegradationEncoder, DegradationInjection, DirectionWeightedAggregation,
                               MoCoDegradationLearner, NetworkConfig, VEMambaNetwork, VolumeMambaModule,
                               axial_pixel_shuffle, count_parameters, interpolate_axial_linear,
                               scan_permutations)
from vemamba_iso.model.scan_orders import from_sequence, inverse_permutation, to_sequence

TINY = dict(dim=8, groups=1, blocks=1, state_size=4, representation_dim=8)


@pytest.mark.parametrize("factor", range(2, 11))
def test_output_shape_for_every_factor(factor):
    torch.manual_seed(factor)
    net = VEMambaNetwork(NetworkConfig(factor=factor, **TINY))
    x = torch.rand(2, 1, 3, 6, 5)
    y = net(x)
    assert y.shape == (2, 1, 3 * factor, 6, 5)
    assert torch.isfinite(y).all()


def test_factor_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="factor"):
        NetworkConfig(factor=11)


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 4, 4), (1, 3, 2), (5, 1, 7), (3, 5, 7), (2, 9, 3)])
@pytest.mark.parametrize("family", sorted(ORDER_AXES))
def test_scan_orders_are_continuous_permutations_with_exact_inverse(shape, family):
    n = int(np.prod(shape))
    perms = scan_permutations(shape, family, lateral_orders=2)
    assert len(perms) == 4
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(n))
        coords = np.stack(np.unravel_index(perm.numpy(), shape), axis=1)
        if n > 1:  # consecutive tokens are grid neighbours: snake, no jumps
            assert np.abs(np.diff(coords, axis=0)).sum(axis=1).max() == 1
        x = torch.randn(2, 3, *shape).flatten(2)
        seq = to_sequence(x, perm)
        assert torch.equal(from_sequence(seq, perm), x)
        assert torch.equal(inverse_permutation(inverse_permutation(perm)), perm)
    # the two lateral orders are different walks wherever both lateral axes are longer than 1
    if shape[1] > 1 and shape[2] > 1:
        assert not torch.equal(perms[0], perms[2])
    assert [p.tolist() for p in scan_permutations(shape, family)] == [p.tolist() for p in perms[:2]]


def test_axial_first_runs_along_the_axial_axis_and_lateral_first_along_lateral():
    shape = (4, 3, 5)
    orders = {family: [np.stack(np.unravel_index(p.numpy(), shape), 1)
                       for p in scan_permutations(shape, family, lateral_orders=2)] for family in FAMILY_ORDERS}
    for axial in orders["axial_first"]:
        assert np.all(axial[:4, 1:] == axial[0, 1:]) and len(set(axial[:4, 0])) == 4  # one column in D first
    hw, _, wh, _ = orders["axial_first"]
    assert len(set(hw[:20, 1])) == 1 and len(set(wh[:12, 2])) == 1  # H slowest, then W; or W slowest, then H
    for lateral in orders["lateral_first"][0::2]:  # forward paths (the reversed ones end there)
        assert np.all(lateral[:15, 0] == 0)  # the whole first lateral plane comes first
    hw, _, wh, _ = orders["lateral_first"]
    assert len(set(hw[:5, 1])) == 1 and len(set(wh[:3, 2])) == 1  # W fastest / H fastest within the plane
    perms = scan_permutations(shape, "axial_first", lateral_orders=2)
    assert torch.equal(perms[1], perms[0].flip(0)) and torch.equal(perms[3], perms[2].flip(0))
    with pytest.raises(ValueError, match="lateral_orders"):
        scan_permutations(shape, "axial_first", lateral_orders=3)


@pytest.mark.parametrize("source,paths", [("restored", 4), ("input", 2), ("restored", 2)])
def test_dwam_weights_are_a_softmax_over_paths(source, paths):
    torch.manual_seed(0)
    dwam = DirectionWeightedAggregation(channels=6, paths=paths, source=source)
    tokens = torch.randn(3, 6, 40)
    outputs = torch.randn(3, paths, 6, 40)
    w = dwam.weights(tokens, outputs)
    assert w.shape == (3, paths, 40)
    assert torch.allclose(w.sum(dim=1), torch.ones(3, 40), atol=1e-6)
    assert (w > 0).all() and w.std() > 0  # per-token weights, not constant
    fused = dwam(tokens, outputs)
    assert torch.allclose(fused, (outputs * w[:, :, None]).sum(1), atol=1e-6)
    if source == "restored":  # the paper's DWAM: 4C -> 2C -> 4 on the restored paths
        assert dwam.mlp[0].in_features == paths * 6 and dwam.mlp[0].out_features == paths * 3
        assert isinstance(dwam.mlp[1], torch.nn.ReLU) and dwam.mlp[2].out_features == paths
        torch.testing.assert_close(w, dwam.weights(torch.randn(3, 6, 40), outputs))  # from the paths alone
        assert not torch.allclose(w, dwam.weights(tokens, torch.randn(3, paths, 6, 40)))


def test_plain_sum_aggregation_has_equal_weights_and_no_parameters():
    dwam = DirectionWeightedAggregation(channels=6, paths=4, source="sum")
    outputs = torch.randn(2, 4, 6, 10)
    assert list(dwam.parameters()) == []
    torch.testing.assert_close(dwam(torch.randn(2, 6, 10), outputs), outputs.mean(1))
    with pytest.raises(ValueError, match="aggregation"):
        DirectionWeightedAggregation(channels=6, paths=4, source="max")


def test_vdim_output_depends_on_the_degradation_representation():
    torch.manual_seed(0)
    vdim = DegradationInjection(dim=8, representation_dim=5)
    x = torch.randn(2, 8, 3, 4, 4)
    a, b = vdim(x, torch.randn(2, 5)), vdim(x, torch.randn(2, 5))
    assert (a - b).abs().max() > 1e-3
    plain = DegradationInjection(dim=8, representation_dim=None)
    plain.norm.load_state_dict(vdim.norm.state_dict())
    assert torch.allclose(plain(x, None), vdim(x, None))  # no representation: plain LayerNorm
    assert torch.allclose(plain(x, None).mean(1), torch.zeros(2, 3, 4, 4), atol=1e-5)


@pytest.mark.parametrize("paths", [4, 2])
def test_every_scan_path_has_its_own_trained_parameters(paths):
    torch.manual_seed(0)
    module = VolumeMambaModule(dim=8, state_size=4, paths_per_chunk=paths)
    module(torch.randn(2, 8, 3, 4, 5)).square().mean().backward()
    assert len(module.scans) == 2  # two chunks: axial-first and lateral-first
    for scan in module.scans:
        assert scan.x_proj.shape[0] == paths
        for param in (scan.x_proj, scan.dt_proj, scan.A_log, scan.D, scan.dt_bias):
            per_path = param.grad.reshape(paths, -1).abs().sum(1)
            assert (per_path > 0).all()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="paths_per_chunk"):
        VolumeMambaModule(dim=8, paths_per_chunk=3)


def test_paper_configuration_and_legacy_models():
    paper = VEMambaNetwork(NetworkConfig(factor=4))  # groups 4, blocks 4, dim 32: the paper's configuration
    module = paper.groups[0].blocks[0].mamba
    assert module.paths_per_chunk == 4 and module.aggregations[0].source == "restored"
    assert count_parameters(paper) > count_parameters(VEMambaNetwork(NetworkConfig(factor=4, paths_per_chunk=2,
                                                                                   aggregation="input")))
    # a model saved before the scan form was recorded is rebuilt in the form it was trained with
    legacy = NetworkConfig.from_dict({"factor": 4, "dim": 8, "groups": 1, "blocks": 1})
    assert (legacy.paths_per_chunk, legacy.aggregation) == (2, "input")
    current = NetworkConfig.from_dict(NetworkConfig(factor=4).to_dict())
    assert (current.paths_per_chunk, current.aggregation) == (4, "restored")


def test_axial_pixel_shuffle_places_channels_at_axial_subpositions():
    x = torch.randn(1, 2 * 3, 4, 2, 2)
    y = axial_pixel_shuffle(x, 3)
    assert y.shape == (1, 2, 12, 2, 2)
    for c in range(2):
        for d in range(4):
            for r in range(3):
                assert torch.equal(y[0, c, d * 3 + r], x[0, c * 3 + r, d])


@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_torch_linear_interpolation_matches_the_numpy_baseline(offset):
    x = np.random.default_rng(0).random((5, 3, 4)).astype(np.float32)
    ours = interpolate_axial_linear(torch.from_numpy(x)[None, None], 4, offset)[0, 0].numpy()
    assert np.allclose(ours, interpolate_axial(x, 4, offset, "linear"), atol=1e-6)


def test_untrained_network_returns_linear_interpolation_and_learns_a_residual():
    net = VEMambaNetwork(NetworkConfig(factor=3, **TINY))
    x = torch.rand(1, 1, 4, 6, 6)
    assert torch.allclose(net(x), interpolate_axial_linear(x, 3, 0.0), atol=1e-6)


@pytest.mark.parametrize("factor", [2, 5, 8])
def test_keep_observed_returns_the_kept_slices_and_learns_only_between_them(factor):
    torch.manual_seed(factor)
    kept = VEMambaNetwork(NetworkConfig(factor=factor, keep_observed=True, **TINY))
    free = VEMambaNetwork(NetworkConfig(factor=factor, **TINY))
    for net in (kept, free):  # a trained-looking output layer: the residual is not zero anywhere
        torch.nn.init.normal_(net.last_conv.weight, std=0.1)
    free.load_state_dict(kept.state_dict())
    x = torch.rand(2, 1, 3, 5, 6, requires_grad=True)
    y, y_free = kept(x), free(x)
    assert torch.equal(y[:, :, ::factor], x.detach())                       # the kept slices, exactly
    between = torch.ones(3 * factor, dtype=torch.bool)
    between[::factor] = False
    assert torch.allclose(y[:, :, between], y_free[:, :, between])       # the rest as without the constraint
    assert not torch.equal(y_free[:, :, ::factor], x.detach())
    y[:, :, ::factor].sum().backward()                                     # no residual gradient from kept slices
    assert kept.last_conv.weight.grad is None or kept.last_conv.weight.grad.abs().max() == 0


def test_keep_observed_needs_samples_on_the_grid():
    with pytest.raises(ValueError, match="integer sample_offset"):
        NetworkConfig(factor=4, sample_offset=1.5, keep_observed=True)
    assert NetworkConfig(factor=5, sample_offset=2.0, keep_observed=True).keep_observed
    with pytest.raises(ValueError, match="training_patch"):
        NetworkConfig(factor=4, training_patch=(8,))
    assert NetworkConfig.from_dict(NetworkConfig(factor=4, training_patch=[8, 32]).to_dict()).training_patch == (8, 32)


def test_degradation_encoder_switch_and_freeze():
    off = VEMambaNetwork(NetworkConfig(factor=2, use_degradation_encoder=False, **TINY))
    on = VEMambaNetwork(NetworkConfig(factor=2, **TINY))
    assert off.degradation_encoder is None and count_parameters(on) > count_parameters(off)
    on.freeze_degradation_encoder()
    on.train()
    assert not on.degradation_encoder.training
    assert not any(p.requires_grad for p in on.degradation_encoder.parameters())


def test_moco_step_updates_queue_and_momentum_encoder():
    torch.manual_seed(0)
    learner = MoCoDegradationLearner(DegradationEncoder(representation_dim=8, width=4), projection_dim=8,
                                     queue_size=16, momentum=0.5)
    key_before = [p.clone() for p in learner.key_encoder.parameters()]
    queue_before = learner.queue.clone()
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    a, b = torch.rand(4, 1, 2, 8, 8), torch.rand(4, 1, 2, 8, 8)
    for _ in range(2):
        loss = learner(a, b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert int(learner.queue_pointer) == 8 and not torch.equal(learner.queue[:8], queue_before[:8])
    assert torch.equal(learner.queue[8:], queue_before[8:])
    assert any(not torch.equal(k, p) for k, p in zip(key_before, learner.key_encoder.parameters()))
    assert all(not p.requires_grad for p in learner.key_encoder.parameters())


def test_cached_scan_paths_are_the_permutations_and_their_inverses():
    from vemamba_iso.model.scan_orders import scan_paths

    shape = (3, 5, 4)
    paths = scan_paths(shape, "lateral_first", "cpu", lateral_orders=2)
    assert paths is scan_paths(shape, "lateral_first", torch.device("cpu"), lateral_orders=2)  # built once
    for (perm, inverse), expected in zip(paths, scan_permutations(shape, "lateral_first", lateral_orders=2)):
        assert torch.equal(perm, expected) and torch.equal(inverse, inverse_permutation(expected))


def test_permute_tokens_gathers_and_its_gradient_is_the_inverse_gather():
    from vemamba_iso.model.scan_orders import permute_tokens

    perm = scan_permutations((3, 5, 4), "axial_first", lateral_orders=2)[1]
    inverse = inverse_permutation(perm)
    tokens = torch.randn(2, 3, 60, dtype=torch.float64)[:, 1:]   # a non-contiguous slice, as a chunk is
    torch.testing.assert_close(permute_tokens(tokens, perm, inverse), tokens[..., perm], rtol=0, atol=0)
    torch.testing.assert_close(permute_tokens(permute_tokens(tokens, perm, inverse), inverse, perm), tokens,
                               rtol=0, atol=0)
    leaf = tokens.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: permute_tokens(t, perm, inverse), (leaf,))


def test_network_output_does_not_depend_on_the_memory_format_inside(monkeypatch):
    """The body runs channels-last (faster convolutions on CPU); the result is the same network function
    as with every map in the standard layout, and per sample the same as in a batch."""
    torch.manual_seed(0)
    net = VEMambaNetwork(NetworkConfig(factor=3, **TINY)).double()
    torch.nn.init.normal_(net.last_conv.weight, std=0.1)
    x = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64)
    y = net(x)
    assert y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last_3d)
    single = torch.cat([net(x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(y, single, rtol=1e-10, atol=1e-10)
    layouts = []
    shallow = net.shallow.forward
    monkeypatch.setattr(net.shallow, "forward", lambda t: layouts.append(shallow(t)) or layouts[-1])
    net(x)
    assert layouts[-1].is_contiguous() and not layouts[-1].is_contiguous(memory_format=torch.channels_last_3d)
    # the same network with the channels-last conversions made no-ops: every map stays channels first
    monkeypatch.setattr(torch, "channels_last_3d", torch.contiguous_format)
    standard = net(x)
    torch.testing.assert_close(standard, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("factor", [2, 4, 7])
def test_axial_pixel_shuffle_is_the_same_in_channels_last(factor):
    x = torch.randn(2, 3 * factor, 3, 4, 5)
    cl = axial_pixel_shuffle(x.contiguous(memory_format=torch.channels_last_3d), factor)
    assert torch.equal(cl, axial_pixel_shuffle(x, factor))
    assert cl.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_conv_feed_forward_is_the_three_convolutions_and_keeps_maps_channels_last(layout):
    from torch.nn import functional as F

    from vemamba_iso.model import ConvFeedForward

    torch.manual_seed(0)
    ffn = ConvFeedForward(6, ratio=2.0)
    x = torch.randn(2, 6, 3, 5, 4).contiguous(memory_format=layout).requires_grad_()
    y = ffn(x)
    x_ref = x.detach().clone().requires_grad_()
    # written out with the module's own convolutions (its 1x1x1 ones run as linear layers)
    expected = ffn.project(F.gelu(ffn.depthwise(ffn.expand(x_ref))))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)  # the layout the network keeps its maps in
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, *ffn.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x_ref, *ffn.parameters()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
