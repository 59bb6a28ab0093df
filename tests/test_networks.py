"""LoG-VMamba blocks inserted into nnU-Net's planned U-Nets (PlainConvUNet, ResidualEncoderUNet)."""
import math
import re
from dataclasses import replace

import pytest
import torch

from nnunet_logmamba.blocks.token_extractors import global_compression
from nnunet_logmamba.networks import (LoGVMambaConfig, PlacementRule, StageWithMamba, build_log_vmamba_network,
                                      insert_log_vmamba_blocks, stage_spatial_sizes)

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def arch_kwargs(arch, strides, features, ndim):
    """Architecture kwargs as nnU-Net's plans write them."""
    n = len(strides)
    kw = {"n_stages": n, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
          "kernel_sizes": [[3] * ndim] * n, "strides": strides, "n_conv_per_stage_decoder": [1] * (n - 1),
          "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
          "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    kw["n_conv_per_stage" if arch == PLAIN else "n_blocks_per_stage"] = [1] * n
    return kw


# (architecture, patch size, strides, features, planned batch size): 4-7 stages, anisotropic strides,
# patch sizes that are odd multiples of the total stride
PLANS = {
    "3d_plain_4stages_aniso": (PLAIN, (12, 40, 24), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                               [4, 8, 16, 16], 2),
    "3d_resenc_5stages": (RESENC, (24, 24, 40), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [3, 1, 1]],
                          [4, 8, 8, 16, 16], 2),
    "3d_plain_6stages_odd": (PLAIN, (24, 48, 32), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 3, 1]],
                             [4, 8, 8, 16, 16, 16], 2),
    "2d_plain_7stages_aniso": (PLAIN, (192, 48), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 1], [3, 1]],
                               [4, 8, 8, 16, 16, 16, 16], 8),
    "2d_resenc_5stages": (RESENC, (40, 72), [[1, 1], [2, 2], [2, 2], [1, 2], [2, 3]], [4, 8, 8, 16, 16], 12),
}


def build(name, deep_supervision=True, config=LoGVMambaConfig(), num_classes=3):
    arch, patch, strides, features, batch = PLANS[name]
    torch.manual_seed(0)
    net = build_log_vmamba_network(arch, arch_kwargs(arch, strides, features, len(patch)), IMPORTS, 1, num_classes,
                                   patch, batch, deep_supervision, config)
    return net, patch


@pytest.mark.parametrize("name", sorted(PLANS))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    net, patch = build(name)
    assert net.log_vmamba_blocks, "at least one block placed"
    x = torch.randn(2, 1, *patch)
    outputs = net(x)
    assert isinstance(outputs, list) and outputs[0].shape == (2, 3, *patch)
    strides = PLANS[name][2]
    for level, out in enumerate(outputs):  # deep supervision: highest resolution first
        assert out.shape[2:] == stage_spatial_sizes(patch, strides)[level]
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # blocks start as the identity: after one optimiser step every parameter of our blocks learns
    # (nnU-Net's own layers may stay at zero gradient: conv biases before instance norm)
    torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9).step()
    net.zero_grad()
    sum(o.square().mean() for o in net(x)).backward()
    block_params = [(n, p) for n, p in net.named_parameters() if ".mamba." in n]
    assert len(block_params) >= 10 * len(net.log_vmamba_blocks)
    assert [n for n, p in block_params if p.grad.abs().sum() == 0] == []


@pytest.mark.parametrize("name", ["3d_plain_4stages_aniso", "2d_resenc_5stages"])
def test_deep_supervision_on_off_same_state_dict(name):
    on, patch = build(name, deep_supervision=True)
    off, _ = build(name, deep_supervision=False)
    assert list(on.state_dict()) == list(off.state_dict())
    off.load_state_dict(on.state_dict(), strict=True)  # what nnUNetv2_predict does
    on.eval(), off.eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        torch.testing.assert_close(off(x), on(x)[0])
    assert any(".mamba." in k for k in on.state_dict())


def _plain_network(name, deep_supervision=True, num_classes=3):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch, patch, strides, features, _ = PLANS[name]
    torch.manual_seed(1)
    return get_network_from_plans(arch, arch_kwargs(arch, strides, features, len(patch)), IMPORTS, 1, num_classes,
                                  allow_init=True, deep_supervision=deep_supervision)


def _plain_key(key):
    """The plain network's name of a LoG-VMamba network's non-block parameter."""
    return re.sub(r"(stages\.\d+)\.stage\.", r"\1.", key)


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("placement", ["by_size", "all_stages", "all_stages_capped"])
def test_a_new_network_is_the_plain_network_of_the_same_weights(name, placement):
    plain = _plain_network(name)
    ours, patch = build(name, config=LoGVMambaConfig(placement=placement))
    plain_state = plain.state_dict()
    ours_state = ours.state_dict()
    conv_keys = [k for k in ours_state if ".mamba." not in k]
    assert sorted(_plain_key(k) for k in conv_keys) == sorted(plain_state)
    ours.load_state_dict({**ours_state, **{k: plain_state[_plain_key(k)] for k in conv_keys}})
    plain.eval(), ours.eval()
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        expected, got = plain(x), ours(x)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_all_stages_places_the_papers_layout():
    config = LoGVMambaConfig(placement="all_stages", global_max_edge=8, last_global_max_edge=4)
    net, patch = build("3d_plain_6stages_odd", config=config)
    strides = PLANS["3d_plain_6stages_odd"][2]
    modes = [(p["stage"], p["mode"]) for p in net.log_vmamba_blocks]
    assert modes == [(0, "local")] + [(i, "local_global") for i in range(1, 5)] + [(5, "global")]
    grids = {p["stage"]: net.encoder.stages[p["stage"]].mamba.global_tokens for p in net.log_vmamba_blocks}
    assert grids[0] is None
    sizes = stage_spatial_sizes(patch, strides)
    for stage in range(1, 6):
        edge = 4 if stage == 5 else 8
        assert grids[stage].compressed_size == global_compression(sizes[stage], edge)[1]
        assert max(grids[stage].compressed_size) <= edge
    with pytest.raises(ValueError, match="unknown placement"):
        LoGVMambaConfig(placement="everywhere")


def test_capped_all_stages_keeps_the_papers_modes_and_skips_stages_over_the_cost_cap():
    capped = LoGVMambaConfig(placement="all_stages_capped", global_max_edge=8, last_global_max_edge=4)
    every = replace(capped, placement="all_stages")
    name = "3d_plain_6stages_odd"
    _, patch, strides, _, batch = PLANS[name]
    sizes = stage_spatial_sizes(patch, strides)
    # a cap between the first and the second stage's positions per batch drops exactly the first stage
    cap = math.prod(sizes[1]) * batch
    assert math.prod(sizes[0]) * batch > cap
    net, _ = build(name, config=capped.with_(max_batch_tokens=cap))
    ref, _ = build(name, config=every)
    modes = [(p["stage"], p["mode"]) for p in net.log_vmamba_blocks]
    assert modes == [(p["stage"], p["mode"]) for p in ref.log_vmamba_blocks][1:]
    assert modes[0] == (1, "local_global")  # the stage's mode in the official layout, not a first-stage LTX
    # a cap below every stage is an error that says what to do, not a network without blocks
    with pytest.raises(ValueError, match="raise max_batch_tokens"):
        build(name, config=capped.with_(max_batch_tokens=1))


def test_all_stages_gives_the_blocks_over_the_cost_cap_their_own_settings():
    name = "3d_plain_6stages_odd"
    _, patch, strides, _, batch = PLANS[name]
    sizes = stage_spatial_sizes(patch, strides)
    cap = math.prod(sizes[1]) * batch  # only the first stage is over it
    lean = LoGVMambaConfig(placement="all_stages", large_map_expand=0.5, large_map_state_size=8,
                           large_map_recompute=True).with_(max_batch_tokens=cap)
    net, _ = build(name, config=lean)
    ref, _ = build(name, config=replace(lean, large_map_expand=None, large_map_state_size=None,
                                        large_map_recompute=False))
    blocks = [net.encoder.stages[p["stage"]].mamba for p in net.log_vmamba_blocks]
    ref_blocks = [ref.encoder.stages[p["stage"]].mamba for p in ref.log_vmamba_blocks]
    channels = net.encoder.output_channels[0]
    assert blocks[0].in_proj.out_features == 2 * round(0.5 * channels) == ref_blocks[0].in_proj.out_features // 2
    assert blocks[0].state_size == 8 and ref_blocks[0].state_size == 16
    assert blocks[0].recompute_tokens == cap and ref_blocks[0].recompute_tokens is None
    for block, other in zip(blocks[1:], ref_blocks[1:]):  # the stages within the cap are untouched
        assert (block.state_size, block.recompute_tokens) == (16, None)
        assert block.in_proj.out_features == other.in_proj.out_features
    # nnU-Net's size estimate counts only the branch output for the recomputed block
    stage, ref_stage = net.encoder.stages[0], ref.encoder.stages[0]
    plain_part = stage.stage.compute_conv_feature_map_size(list(patch)) if hasattr(stage.stage, "compute_conv_feature_map_size") \
        else stage.stage[-1].compute_conv_feature_map_size(list(patch))
    assert stage.compute_conv_feature_map_size(list(patch)) == plain_part + channels * math.prod(sizes[0])
    assert ref_stage.compute_conv_feature_map_size(list(patch)) > stage.compute_conv_feature_map_size(list(patch))
    # the network still trains end to end with the recomputed block
    x = torch.randn(batch, 1, *patch)
    out = net(x)
    sum(o.float().mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    for bad, match in [(dict(large_map_expand=0.0), "large_map_expand"),
                       (dict(large_map_state_size=0), "large_map_state_size"),
                       (dict(large_map_recompute=True), "placement='all_stages'"),
                       (dict(placement="all_stages_capped", large_map_state_size=8), "placement='all_stages'")]:
        with pytest.raises(ValueError, match=match):
            LoGVMambaConfig(**bad)


def test_placement_follows_spatial_size_not_stage_index():
    rule = PlacementRule()
    assert rule.mode_for((20, 28, 20), batch_size=7) == "local"  # e ~ 22 > 18
    assert rule.mode_for((10, 14, 10), batch_size=7) == "local_global"
    assert rule.mode_for((5, 7, 5), batch_size=7) == "global"
    assert rule.mode_for((40, 56, 40), batch_size=7) is None  # too many positions per batch
    # the same stage index gets different blocks when the patch differs
    small, _ = build("3d_plain_4stages_aniso")
    config = LoGVMambaConfig()
    arch, _, strides, features, _ = PLANS["3d_plain_4stages_aniso"]
    big = build_log_vmamba_network(arch, arch_kwargs(arch, strides, features, 3), IMPORTS, 1, 3, (24, 80, 48), 1,
                                   True, config)
    modes_small = {p["stage"]: p["mode"] for p in small.log_vmamba_blocks}
    modes_big = {p["stage"]: p["mode"] for p in big.log_vmamba_blocks}
    assert modes_small != modes_big
    for net, patch in ((small, (12, 40, 24)), (big, (24, 80, 48))):
        for p in net.log_vmamba_blocks:
            assert p["size"] == stage_spatial_sizes(patch, strides)[p["stage"]]
            assert p["mode"] == config.rule.mode_for(p["size"], 2 if net is small else 1)


def test_weights_of_another_block_placement_are_refused_with_the_reason():
    arch, patch, strides, features, batch = PLANS["3d_plain_4stages_aniso"]
    trained, _ = build("3d_plain_4stages_aniso")
    # the same plans with a larger batch: the cost cap leaves a stage without its block
    edited = build_log_vmamba_network(arch, arch_kwargs(arch, strides, features, 3), IMPORTS, 1, 3, patch, 400, True,
                                      LoGVMambaConfig())
    assert len(edited.log_vmamba_blocks) < len(trained.log_vmamba_blocks)
    with pytest.raises(RuntimeError, match=r"the weights hold LoG-VMamba blocks in \['encoder.stages.0', "
                                           r"'encoder.stages.1', 'encoder.stages.2', 'encoder.stages.3'\], this "
                                           r"network in \['encoder.stages.3'\].*plans.json saved next to"):
        edited.load_state_dict(trained.state_dict())
    # other token modes at the same stages
    local_only = build("3d_plain_4stages_aniso", config=LoGVMambaConfig(rule=PlacementRule(variant="local")))[0]
    with pytest.raises(RuntimeError, match="have other parameters in the weights"):
        local_only.load_state_dict(trained.state_dict())
    with pytest.raises(RuntimeError, match="the weights hold LoG-VMamba blocks"):   # non-strict too
        edited.load_state_dict(trained.state_dict(), strict=False)
    # the weights of a compiled network: torch's own error, which names the prefix
    with pytest.raises(RuntimeError, match="Unexpected key") as raised:
        edited.load_state_dict({f"_orig_mod.{k}": v for k, v in trained.state_dict().items()})
    assert "plans.json" not in str(raised.value)
    # the network's own weights load; weights without blocks are left to the caller
    build("3d_plain_4stages_aniso")[0].load_state_dict(trained.state_dict())
    without_blocks = {k: v for k, v in trained.state_dict().items() if ".mamba." not in k}
    with pytest.raises(RuntimeError, match="Missing key") as raised:
        edited.load_state_dict(without_blocks)
    assert "LoG-VMamba" not in str(raised.value)


def test_2d_places_blocks_in_the_decoder_3d_in_the_encoder():
    net2d, _ = build("2d_plain_7stages_aniso")
    net3d, _ = build("3d_plain_6stages_odd")
    assert {p["where"] for p in net2d.log_vmamba_blocks} == {"decoder"}
    assert all(isinstance(net2d.decoder.stages[p["stage"]], StageWithMamba)
               for p in net2d.log_vmamba_blocks if p["where"] == "decoder")
    assert {p["where"] for p in net3d.log_vmamba_blocks} == {"encoder"}
    # the decoder shares the encoder object: blocks are visible through both
    assert net3d.decoder.encoder is net3d.encoder


@pytest.mark.parametrize("variant,modes", [("local", {"local"}), ("global", {"global"})])
def test_variants_use_one_token_mode(variant, modes):
    net, _ = build("3d_resenc_5stages", config=LoGVMambaConfig().with_(variant=variant))
    assert {p["mode"] for p in net.log_vmamba_blocks} == modes


def test_join_and_directions_reach_every_block():
    net, _ = build("3d_plain_4stages_aniso", config=LoGVMambaConfig(join="split", directions=4))
    blocks = [m for m in net.modules() if isinstance(m, StageWithMamba)]
    assert blocks and all(b.mamba.join == "split" and b.mamba.directions == 4 for b in blocks)


def test_stage_sizes_need_divisible_patch():
    assert stage_spatial_sizes((12, 40), [[1, 1], [2, 2], [3, 2]]) == [(12, 40), (6, 20), (2, 10)]
    with pytest.raises(ValueError, match="not divisible"):
        stage_spatial_sizes((13, 40), [[1, 1], [2, 2]])
    with pytest.raises(ValueError, match="does not match"):
        stage_spatial_sizes((12, 40), [[1, 1, 1]])


def test_bad_networks_and_settings_raise_clear_errors():
    with pytest.raises(TypeError, match="PlainConvUNet or ResidualEncoderUNet"):
        insert_log_vmamba_blocks(torch.nn.Conv2d(1, 1, 1), (8, 8))
    net, _ = build("2d_resenc_5stages")
    with pytest.raises(ValueError, match="axes"):
        insert_log_vmamba_blocks(net, (8, 8, 8))
    arch, patch, strides, features, _ = PLANS["2d_resenc_5stages"]
    with pytest.raises(ValueError, match="max_batch_tokens"):
        build_log_vmamba_network(arch, arch_kwargs(arch, strides, features, 2), IMPORTS, 1, 2, patch, 1, True,
                                 LoGVMambaConfig().with_(max_batch_tokens=1))
    with pytest.raises(ValueError, match="unknown variant"):
        PlacementRule(variant="both")
    both, _ = build("2d_resenc_5stages", config=LoGVMambaConfig(encoder_stages="all"))
    assert {p["where"] for p in both.log_vmamba_blocks} == {"encoder", "decoder"}
    with pytest.raises(ValueError, match="encoder_stages"):
        build_log_vmamba_network(arch, arch_kwargs(arch, strides, features, 2), IMPORTS, 1, 2, patch, 1, True,
                                 LoGVMambaConfig(encoder_stages="first"))
