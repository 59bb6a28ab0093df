"""VEMamba network: shapes for every factor, scan orders, DWAM, VDIM, MoCo encoder."""
import numpy as np
import pytest
import torch

from vemamba_iso.evaluation.baselines import interpolate_axial
from vemamba_iso.model import (ORDER_AXES, DegradationEncoder, DegradationInjection, DirectionWeightedAggregation,
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


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 4, 4), (1, 3, 2), (5, 1, 7)])
@pytest.mark.parametrize("family", sorted(ORDER_AXES))
def test_scan_orders_are_continuous_permutations_with_exact_inverse(shape, family):
    n = int(np.prod(shape))
    for perm in scan_permutations(shape, family):
        assert sorted(perm.tolist()) == list(range(n))
        coords = np.stack(np.unravel_index(perm.numpy(), shape), axis=1)
        if n > 1:  # consecutive tokens are grid neighbours: snake, no jumps
            assert np.abs(np.diff(coords, axis=0)).sum(axis=1).max() == 1
        x = torch.randn(2, 3, *shape).flatten(2)
        seq = to_sequence(x, perm)
        assert not (n > 2 and torch.equal(perm, torch.arange(n)) and family == "axial_first")
        assert torch.equal(from_sequence(seq, perm), x)
        assert torch.equal(inverse_permutation(inverse_permutation(perm)), perm)


def test_axial_first_runs_along_the_axial_axis_and_lateral_first_along_lateral():
    shape = (4, 3, 5)
    axial = np.stack(np.unravel_index(scan_permutations(shape, "axial_first")[0].numpy(), shape), 1)
    lateral = np.stack(np.unravel_index(scan_permutations(shape, "lateral_first")[0].numpy(), shape), 1)
    assert np.all(axial[:4, 1:] == axial[0, 1:]) and len(set(axial[:4, 0])) == 4  # first 4 tokens: one column in D
    assert np.all(lateral[:15, 0] == 0)  # the whole first lateral plane comes first
    fwd, rev = scan_permutations(shape, "axial_first")
    assert torch.equal(rev, fwd.flip(0))


def test_dwam_weights_are_a_softmax_over_paths():
    dwam = DirectionWeightedAggregation(channels=6, paths=2)
    tokens = torch.randn(3, 6, 40)
    w = dwam.weights(tokens)
    assert w.shape == (3, 2, 40)
    assert torch.allclose(w.sum(dim=1), torch.ones(3, 40), atol=1e-6)
    assert (w > 0).all() and w.std() > 0  # per-token weights, not constant
    outputs = torch.randn(3, 2, 6, 40)
    fused = dwam(tokens, outputs)
    assert torch.allclose(fused, (outputs * w[:, :, None]).sum(1), atol=1e-6)


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


def test_every_scan_path_has_its_own_trained_parameters():
    torch.manual_seed(0)
    module = VolumeMambaModule(dim=8, state_size=4)
    module(torch.randn(2, 8, 3, 4, 4)).square().mean().backward()
    for scan in module.scans:
        assert scan.x_proj.shape[0] == 2
        for param in (scan.x_proj, scan.dt_proj, scan.A_log, scan.D):
            per_path = param.grad.reshape(2, -1).abs().sum(1)
            assert (per_path > 0).all()


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
