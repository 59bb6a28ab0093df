"""A trained plain nnU-Net as the start of a LoG-VMamba training (``nnunet_logmamba from-plain``)."""
import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_logmamba.networks import LoGVMambaConfig
from nnunet_logmamba.training.from_plain import plain_twin_keys, weights_from_plain

from test_networks import PLANS, _plain_network, build


@pytest.mark.parametrize("name", ["3d_plain_4stages_aniso", "3d_resenc_5stages", "2d_plain_7stages_aniso"])
@pytest.mark.parametrize("placement", ["by_size", "all_stages"])
def test_converted_weights_load_through_nnunet_and_give_the_plain_networks_output(tmp_path, name, placement):
    plain = _plain_network(name)
    with torch.no_grad():   # a trained network, not a fresh one: every tensor differs from ours
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours, patch = build(name, config=LoGVMambaConfig(placement=placement))
    twins = plain_twin_keys(ours)
    assert any(t is None for t in twins.values()) and sorted(t for t in twins.values() if t) == \
        sorted(plain.state_dict())
    path = tmp_path / "start.pth"
    torch.save({"network_weights": weights_from_plain(ours, plain.state_dict())}, path)
    fresh_blocks = {k: v.clone() for k, v in ours.state_dict().items() if twins[k] is None}
    load_pretrained_weights(ours, str(path))   # what nnUNetv2_train -pretrained_weights runs
    state = ours.state_dict()
    for key, value in state.items():
        if twins[key] is None:
            torch.testing.assert_close(value, fresh_blocks[key], rtol=0, atol=0)
        elif ".seg_layers." not in key:
            torch.testing.assert_close(value, plain.state_dict()[twins[key]], rtol=0, atol=0)
    # nnU-Net starts the 1x1 segmentation layers of any pretrained weights afresh; with the plain ones too
    # the whole network is the plain network
    ours.load_state_dict({**state, **{k: plain.state_dict()[twins[k]] for k in state if ".seg_layers." in k}})
    plain.eval(), ours.eval()
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        expected, got = plain(x), ours(x)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_weights_of_other_plans_are_refused_with_the_reason():
    ours, _ = build("3d_plain_4stages_aniso")
    other = _plain_network("3d_resenc_5stages").state_dict()
    with pytest.raises(ValueError, match="do not fit these plans .*(missing|shape|no place).*same plans"):
        weights_from_plain(ours, other)
    plain = _plain_network("3d_plain_4stages_aniso").state_dict()
    key = next(iter(plain))
    with pytest.raises(ValueError, match=f"{key} has shape"):
        weights_from_plain(ours, {**plain, key: plain[key][..., :1]})
