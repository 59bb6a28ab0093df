"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture()
def one_torch_thread():
    """Small tensors, many ops: one thread avoids waiting on descheduled threads on a busy machine.

    Opt in per file with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model directory holding an untrained, tiny x2 VEMamba network (fast to run on CPU).

    Its output convolution is random, not zero as in a new network, so that its output is the
    interpolation plus a residual that depends on every tile's content: tests comparing tilings, blocks
    or views then compare the network's work, not only the interpolation.
    """
    from vemamba_iso.model import NetworkConfig, VEMambaNetwork
    from vemamba_iso.training.checkpoint import save_model

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    network = VEMambaNetwork(NetworkConfig(factor=2, dim=8, groups=1, blocks=1, state_size=4, representation_dim=8))
    torch.nn.init.normal_(network.last_conv.weight, std=0.02)
    save_model(folder, network, {"normalisation": {"scheme": "RGBTo01Normalization"},
                                 "degradation": {"preset": "subsample"}, "axis": 0})
    return folder
