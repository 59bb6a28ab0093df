"""SSIM/PSNR, the loss, the schedule, training, checkpoints and resume, tiled inference."""
import json

import numpy as np
import pytest
import torch

from vemamba_iso.evaluation.metrics import psnr, ssim, volume_metrics
from vemamba_iso.inference import blend_ramp, reconstruct_volume, tile_starts
from vemamba_iso.training import (Trainer, TrainingConfig, learning_rate_factor, load_model, reconstruction_loss,
                                  training_stages)

TINY_NET = dict(dim=8, groups=1, blocks=1, state_size=4, representation_dim=8)


def tiny_volume(shape=(40, 40, 40), seed=0):
    from scipy.ndimage import gaussian_filter
    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    return ((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)


def test_ssim_matches_scikit_image_in_2d_and_3d():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(0)
    for shape in [(40, 50), (20, 24, 22)]:
        a = rng.random(shape)
        b = np.clip(a + 0.2 * rng.standard_normal(shape), 0, 1)
        reference = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)
        ours = float(ssim(torch.from_numpy(a), torch.from_numpy(b), data_range=1.0))
        assert abs(ours - reference) < 1e-5
        assert 0.1 < ours < 0.9
    x = torch.rand(16, 16)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_psnr_known_value_and_plane_metrics():
    a = np.zeros((12, 12, 12), np.float32)
    assert psnr(a + 0.1, a, data_range=1.0) == pytest.approx(20.0, abs=1e-6)
    gt = np.random.default_rng(1).random((12, 14, 16)).astype(np.float32)
    m = volume_metrics(gt, gt, 1.0)
    assert m["psnr"] == float("inf") and all(m[k] == pytest.approx(1.0) for k in
                                             ("ssim_3d", "ssim_xy", "ssim_xz", "ssim_yz"))
    blurred = gt.copy()
    blurred[1:-1] = (gt[:-2] + gt[1:-1] + gt[2:]) / 3  # blur along Z only
    m = volume_metrics(blurred, gt, 1.0)
    assert m["ssim_xy"] > m["ssim_xz"] and m["ssim_xy"] > m["ssim_yz"]


def test_loss_is_zero_for_perfect_prediction_and_has_gradients():
    t = torch.rand(2, 1, 12, 12, 12)
    assert float(reconstruction_loss(t, t)) == pytest.approx(0.0, abs=1e-5)
    p = (t + 0.1 * torch.randn_like(t)).requires_grad_()
    loss = reconstruction_loss(p, t)
    loss.backward()
    assert loss > 0 and p.grad.abs().sum() > 0


def test_warmup_then_cosine_schedule():
    values = [learning_rate_factor(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)


def test_time_fraction_brings_the_cosine_decay_forward():
    # half of the time spent at step 20 of 100: the schedule is where step 55 would be without a limit
    assert learning_rate_factor(20, 100, 10, 0.1, 0.5) == pytest.approx(learning_rate_factor(55, 100, 10, 0.1))
    assert learning_rate_factor(20, 100, 10, 0.1, 1.0) == pytest.approx(0.1)
    assert learning_rate_factor(5, 100, 10, 0.1, 0.3) == pytest.approx(0.6)   # warm-up is by steps...
    # ...but a time limit reached during warm-up (a slow machine) still ends at the floor
    assert learning_rate_factor(5, 100, 10, 0.1, 1.0) == pytest.approx(0.1)
    assert learning_rate_factor(90, 100, 10, 0.1, 0.2) == pytest.approx(learning_rate_factor(90, 100, 10, 0.1))


def tiny_config(**overrides):
    base = dict(steps=40, batch_size=2, low_res_length=4, lateral=16, learning_rate=3e-3, warmup_steps=2,
                steps_per_epoch=20, moco_steps=2, moco_batch_size=4, network=TINY_NET)
    return TrainingConfig(**{**base, **overrides})


def test_time_limit_stops_training_with_a_final_validation_and_model(tmp_path, monkeypatch):
    from vemamba_iso.training import trainer as trainer_module
    clock = {"now": 1000.0}
    monkeypatch.setattr(trainer_module.time, "time", lambda: clock["now"])
    trainer = Trainer([tiny_volume()], 2, tmp_path / "model", tiny_config(steps=1000, time_limit_minutes=1.0),
                      progress=False, log=lambda *_: None)
    original_step = trainer.train_step

    def step_taking_7_seconds():
        clock["now"] += 7.0
        return original_step()

    trainer.train_step = step_taking_7_seconds
    metadata = trainer.run()
    training = metadata["training"]
    assert training["steps_done"] == 9                   # 9 x 7 s = 63 s >= 60 s, 8 x 7 s = 56 s is not
    assert training["seconds"] == pytest.approx(63.0)
    assert training["history"][-1]["step"] == 9 and "val_psnr" in training["history"][-1]
    # the learning rate reached the schedule's floor when the time ran out
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.02)
    assert (tmp_path / "model" / "model.pt").exists()
    # run again: the time is spent, nothing more is trained
    again = Trainer([tiny_volume()], 2, tmp_path / "model", tiny_config(steps=1000, time_limit_minutes=1.0),
                    progress=False, log=lambda *_: None)
    assert again.run()["training"]["steps_done"] == 9


@pytest.mark.parametrize("limit", [0.0, -1.0])
def test_a_non_positive_time_limit_is_refused_before_any_work(tmp_path, limit):
    with pytest.raises(ValueError, match="time_limit_minutes must be positive"):
        Trainer([tiny_volume()], 2, tmp_path / "model", tiny_config(time_limit_minutes=limit), progress=False,
                log=lambda *_: None)
    assert not (tmp_path / "model").exists()


def test_training_reduces_the_loss_on_a_tiny_volume(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer([tiny_volume()], 2, tmp_path / "model", tiny_config(), progress=False, log=lambda *_: None)
    rng_batch = trainer.sampler.batch(4)
    x, y = (torch.from_numpy(a) for a in rng_batch)
    trainer.network.freeze_degradation_encoder()

    def fixed_loss():
        trainer.network.eval()
        with torch.no_grad():
            return float(reconstruction_loss(trainer.network(x), y))
    before = fixed_loss()
    trainer.run(resume=False)
    after = fixed_loss()
    assert after < 0.95 * before  # starts from linear interpolation, which is already decent
    history = trainer.history
    assert len(history) == 2 and all("val_psnr" in h and "val_ssim" in h for h in history)


def test_validation_region_is_a_z_slab_or_for_thin_stacks_an_x_slab():
    from vemamba_iso.training.trainer import split_validation

    thick = np.arange(100 * 8 * 60).reshape(100, 8, 60)
    train, held, which = split_validation(thick, 0.15, 16, 40)
    assert which == "Z" and held.shape == (16, 8, 60) and train.shape == (84, 8, 60)
    assert np.array_equal(np.concatenate([train, held], 0), thick)
    thin = np.arange(20 * 8 * 200).reshape(20, 8, 200)   # 20 sections: too few to hold out Z
    train, held, which = split_validation(thin, 0.15, 16, 40)
    assert which == "X" and held.shape == (20, 8, 40) and train.shape == (20, 8, 160)
    assert np.array_equal(np.concatenate([train, held], 2), thin)
    train, held, which = split_validation(thin[..., :60], 0.15, 16, 40)
    assert which == "none" and held is None and train.shape == (20, 8, 60)


def test_thin_anisotropic_stack_still_reports_validation(tmp_path):
    messages = []
    config = tiny_config(steps=2, steps_per_epoch=2, lateral=12)
    trainer = Trainer([tiny_volume((14, 96, 96))], 4, tmp_path / "m", config, progress=False, log=messages.append)
    trainer.run(resume=False)
    assert any("along X" in m for m in messages)
    assert "val_psnr" in trainer.history[-1] and np.isfinite(trainer.history[-1]["val_psnr"])


def test_checkpoint_metadata_and_resume_after_interruption(tmp_path):
    out = tmp_path / "model"
    first = Trainer([tiny_volume()], 3, out, tiny_config(steps=4, steps_per_epoch=2), progress=False,
                    log=lambda *_: None)
    first.run()
    meta = json.loads((out / "metadata.json").read_text())
    for key in ("factor", "axis", "network", "normalisation", "version", "degradation", "training"):
        assert key in meta
    assert meta["factor"] == 3 and meta["normalisation"]["scheme"] == "RGBTo01Normalization"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pt", "metadata.json", "model.pt"]
    # "Interrupted" run asked for more steps: it resumes at step 4 instead of starting again.
    messages = []
    second = Trainer([tiny_volume()], 3, out, tiny_config(steps=6, steps_per_epoch=2), progress=False,
                     log=messages.append)
    second.run()
    assert any("resuming" in m and "step 4" in m for m in messages)
    assert [h["step"] for h in second.history] == [2, 4, 6]
    network, metadata = load_model(out)
    assert metadata["training"]["steps_done"] == 6 and network.config.factor == 3
    for a, b in zip(network.state_dict().values(), second.network.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    with pytest.raises(ValueError, match="factor"):
        Trainer([tiny_volume()], 2, out, tiny_config(), progress=False).try_resume()
    # another network width: a clear error naming the options, not a state-dict traceback
    wider = tiny_config(network={**TINY_NET, "dim": TINY_NET["dim"] + 4})
    with pytest.raises(ValueError, match="another network configuration.*--restart"):
        Trainer([tiny_volume()], 3, out, wider, progress=False).try_resume()
    assert second.network.config.keep_observed
    # a checkpoint from before kept slices existed resumes with the objective it was started with
    resume_file = out / "checkpoint_last.pt"
    state = torch.load(resume_file, weights_only=True)
    del state["keep_observed"]
    torch.save(state, resume_file)
    older = Trainer([tiny_volume()], 3, out, tiny_config(steps=6, steps_per_epoch=2), progress=False,
                    log=lambda *_: None)
    assert older.try_resume() and not older.network.config.keep_observed


def test_kept_slices_follow_the_degradation_and_older_models_read_it_from_their_preset(tmp_path):
    from vemamba_iso.training.checkpoint import network_settings

    trainer = Trainer([tiny_volume()], 3, tmp_path / "a", tiny_config(steps=2), progress=False)
    assert trainer.network.config.keep_observed                       # subsample: sections are kept slices
    pooled = Trainer([tiny_volume()], 3, tmp_path / "b", tiny_config(steps=2, degradation="average_pool"),
                     progress=False)
    assert not pooled.network.config.keep_observed
    older = {"network": {"factor": 4, "dim": 8}, "degradation": {"preset": "subsample"}}
    assert network_settings(older)["keep_observed"] is True
    assert network_settings({**older, "degradation": {"preset": "realistic"}})["keep_observed"] is False
    saved = {**older, "network": {**older["network"], "keep_observed": False}}
    assert network_settings(saved)["keep_observed"] is False           # a recorded choice is kept
    shipped, metadata = load_model(None)
    assert metadata["degradation"]["preset"] == "subsample" and shipped.config.keep_observed
    # the training patch: recorded by new trainings, read from the training record of older models
    assert trainer.network.config.training_patch == (4, 16)
    assert network_settings({**older, "training": {"low_res_length": 8, "lateral": 32}})["training_patch"] == (8, 32)
    assert "training_patch" not in network_settings(older)
    assert shipped.config.training_patch == (metadata["training"]["low_res_length"], metadata["training"]["lateral"])


class NearestUpsampler(torch.nn.Module):
    """A strictly local stand-in network, so tiled and whole-volume results must agree exactly."""

    def __init__(self, factor):
        super().__init__()
        self.config = type("C", (), {"factor": factor})()
        self.largest_tile = (0, 0, 0)

    def forward(self, x):
        self.largest_tile = tuple(max(a, b) for a, b in zip(self.largest_tile, x.shape[2:]))
        return x.repeat_interleave(self.config.factor, dim=2) * 2


def test_tiled_reconstruction_blends_to_the_whole_volume_result_with_bounded_tiles():
    volume = np.random.default_rng(0).random((11, 37, 29)).astype(np.float32)
    model = NearestUpsampler(3)
    out = reconstruct_volume(model, volume, tile=(4, 16, 12), overlap=(2, 4, 4), progress=False)
    assert out.shape == (33, 37, 29)
    assert np.allclose(out, np.repeat(volume, 3, axis=0) * 2, atol=1e-5)
    assert model.largest_tile == (4, 16, 12)
    assert tile_starts(10, 4, 2) == [0, 2, 4, 6] and tile_starts(3, 8, 2) == [0]
    ramp = blend_ramp(8, 3, at_start=False, at_end=True)
    assert ramp[0] < ramp[2] < ramp[-1] == 1


def test_default_tiles_are_the_training_patch_with_a_quarter_overlap():
    from vemamba_iso.inference import default_tiling
    from vemamba_iso.inference.tiling import FALLBACK_OVERLAP, FALLBACK_TILE

    volume = np.random.default_rng(1).random((11, 37, 29)).astype(np.float32)
    model = NearestUpsampler(2)
    assert default_tiling(model) == (FALLBACK_TILE, FALLBACK_OVERLAP)   # no recorded patch
    model.config.training_patch = (4, 12)
    assert default_tiling(model) == ((4, 12, 12), (1, 3, 3))
    out = reconstruct_volume(model, volume, progress=False)
    assert model.largest_tile == (4, 12, 12)
    assert np.allclose(out, np.repeat(volume, 2, axis=0) * 2, atol=1e-5)
    model.largest_tile = (0, 0, 0)
    reconstruct_volume(model, volume, tile=(6, 20, 20), progress=False)   # explicit tile, quarter overlap
    assert model.largest_tile == (6, 20, 20)


def test_tiled_reconstruction_with_the_network_is_close_to_untiled():
    from vemamba_iso.model import NetworkConfig, VEMambaNetwork
    torch.manual_seed(0)
    net = VEMambaNetwork(NetworkConfig(factor=2, **TINY_NET))
    torch.nn.init.normal_(net.last_conv.weight, std=0.05)
    volume = np.random.default_rng(0).random((8, 24, 24)).astype(np.float32)
    whole = reconstruct_volume(net, volume, tile=(8, 24, 24), progress=False)
    tiled = reconstruct_volume(net, volume, tile=(6, 16, 16), overlap=(2, 6, 6), progress=False)
    assert whole.shape == tiled.shape == (16, 24, 24)
    assert np.abs(whole - tiled).mean() < 0.1 * np.abs(whole).mean()


def test_training_without_degradation_encoder(tmp_path):
    config = tiny_config(steps=2, steps_per_epoch=2, network={**TINY_NET, "use_degradation_encoder": False})
    trainer = Trainer([tiny_volume()], 2, tmp_path / "m", config, progress=False, log=lambda *_: None)
    trainer.run()
    network, metadata = load_model(tmp_path / "m")
    assert network.degradation_encoder is None and metadata["network"]["use_degradation_encoder"] is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_forward_backward_on_cuda():
    from vemamba_iso.model import NetworkConfig, VEMambaNetwork
    net = VEMambaNetwork(NetworkConfig(factor=4, **TINY_NET)).cuda()
    torch.nn.init.normal_(net.last_conv.weight, std=0.05)
    x = torch.rand(2, 1, 4, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = net(x)
    loss = reconstruction_loss(y.float(), torch.rand_like(y.float()))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_flip_averaging_is_exact_for_an_equivariant_model_and_changes_a_real_one():
    volume = np.random.default_rng(3).random((6, 20, 20)).astype(np.float32)
    stand_in = NearestUpsampler(2)
    plain = reconstruct_volume(stand_in, volume, tile=(4, 12, 12), overlap=(1, 4, 4), progress=False)
    averaged = reconstruct_volume(stand_in, volume, tile=(4, 12, 12), overlap=(1, 4, 4), progress=False,
                                  flip_average=True)
    assert np.allclose(plain, averaged, atol=1e-5)
    from vemamba_iso.model import NetworkConfig, VEMambaNetwork
    torch.manual_seed(0)
    net = VEMambaNetwork(NetworkConfig(factor=2, **TINY_NET))
    torch.nn.init.normal_(net.last_conv.weight, std=0.05)
    a = reconstruct_volume(net, volume, tile=(6, 20, 20), progress=False)
    b = reconstruct_volume(net, volume, tile=(6, 20, 20), progress=False, flip_average=True)
    assert a.shape == b.shape and np.abs(a - b).max() > 1e-4


def test_initialise_from_a_model_for_another_factor(tmp_path):
    source = Trainer([tiny_volume()], 2, tmp_path / "x2", tiny_config(steps=2, steps_per_epoch=2), progress=False,
                     log=lambda *_: None)
    source.run()
    target = Trainer([tiny_volume()], 3, tmp_path / "x3", tiny_config(steps=2), progress=False, log=lambda *_: None)
    copied = target.initialise_from(tmp_path / "x2")
    own = target.network.state_dict()
    assert copied == len(own) - 2  # all but the upsampling convolution (weight, bias), whose shape differs
    assert torch.equal(own["shallow.weight"], source.network.state_dict()["shallow.weight"])
    # the record keeps the run it started from, also through an interruption and a resume
    target.save()
    resumed = Trainer([tiny_volume()], 3, tmp_path / "x3", tiny_config(steps=4), progress=False, log=lambda *_: None)
    assert resumed.try_resume()
    metadata = resumed.run(resume=False)
    stages = training_stages(metadata)
    assert [(s["factor"], s["steps"]) for s in stages] == [(2, 2), (3, 4)]
    assert stages[0]["initialised_from"] is None and stages[1]["initialised_from"] == str(tmp_path / "x2")
    assert stages[0]["batch_size"] == 2 and stages[0]["learning_rate"] == 3e-3
    _, reloaded = load_model(tmp_path / "x3")   # the record travels with the model file
    assert training_stages(reloaded) == stages
    assert target.moco_done


def test_weight_average_follows_its_decay_and_gives_the_trained_weights_back():
    from vemamba_iso.training.weight_average import WeightAverage
    w = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([("w", w)], decay=0.5)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            w.fill_(value)
        d = min(0.5, (1 + step) / (10 + step))     # warm-up: 0.1, 0.18, 0.25, then the decay 0.5
        expected = d * expected + (1 - d) * value
        average.update()
        assert torch.allclose(average.average["w"], expected)
    with average.applied():
        assert torch.allclose(w, expected)
    assert torch.equal(w, torch.full((3,), 4.0))   # the trained weights are back after the block
    restored = WeightAverage([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert torch.equal(restored.average["w"], average.average["w"]) and restored.updates == 4
    with pytest.raises(ValueError, match="holds other tensors"):
        WeightAverage([("v", w)], 0.5).load_state_dict(average.state_dict())
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage([("w", w)], bad)


def test_training_with_a_weight_average_writes_and_validates_the_average(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    trainer = Trainer([tiny_volume()], 2, tmp_path / "model", tiny_config(steps=6, steps_per_epoch=3,
                                                                          weight_average_decay=0.9), **quiet)
    metadata = trainer.run(resume=False)
    assert metadata["training"]["weight_average_decay"] == 0.9 and trainer.weight_average.updates == 6
    network, _ = load_model(tmp_path / "model")
    written = network.state_dict()
    trained = dict(trainer.network.named_parameters())
    averaged = [n for n in trained if not n.startswith("degradation_encoder.")]
    assert averaged and set(averaged) == set(trainer.weight_average.average)
    for name in averaged:
        assert torch.equal(written[name], trainer.weight_average.average[name]), name
    assert any(not torch.equal(written[n], trained[n].detach()) for n in averaged)   # not the last weights
    for name, tensor in trained.items():       # the frozen encoder is written as it is
        if name.startswith("degradation_encoder."):
            assert torch.equal(written[name], tensor.detach()), name
    # validation measured the average: the validation of the written model gives the last record again
    trainer.weight_average = None
    trainer.network.load_state_dict(written)
    assert trainer.validate()["val_psnr"] == trainer.history[-1]["val_psnr"]
    with pytest.raises(ValueError, match="weight_average_decay must be in"):
        Trainer([tiny_volume()], 2, tmp_path / "other", tiny_config(weight_average_decay=1.0), **quiet)


def test_a_resumed_run_keeps_the_weight_average_it_started_with(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    Trainer([tiny_volume()], 2, tmp_path / "averaged", tiny_config(steps=2, steps_per_epoch=2,
                                                                   weight_average_decay=0.9), **quiet).run()
    Trainer([tiny_volume()], 2, tmp_path / "plain", tiny_config(steps=2, steps_per_epoch=2), **quiet).run()
    adopted = Trainer([tiny_volume()], 2, tmp_path / "averaged", tiny_config(steps=4, steps_per_epoch=2), **quiet)
    assert adopted.try_resume() and adopted.config.weight_average_decay == 0.9
    adopted.run(resume=False)
    assert adopted.weight_average.updates == 4 and adopted.metadata()["training"]["weight_average_decay"] == 0.9
    for folder, decay, message in (("averaged", 0.99, "trained with --weight-average 0.9, not 0.99"),
                                   ("averaged", 0.0, "trained with --weight-average 0.9, not 0"),
                                   ("plain", 0.9, "trained with --weight-average 0, not 0.9")):
        with pytest.raises(ValueError, match=message):
            Trainer([tiny_volume()], 2, tmp_path / folder, tiny_config(steps=4, weight_average_decay=decay),
                    **quiet).try_resume()
    plain = Trainer([tiny_volume()], 2, tmp_path / "plain", tiny_config(steps=4, steps_per_epoch=2), **quiet)
    plain.run()
    assert plain.weight_average is None and plain.metadata()["training"]["weight_average_decay"] == 0.0


@pytest.mark.parametrize("weight_average_decay", [0.0, 0.9])
def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, weight_average_decay):
    """Killed mid-epoch (nothing after its last checkpoint survives), then resumed: the same weights (and weight
    average), bit for bit."""
    config = tiny_config(steps=6, steps_per_epoch=2, weight_average_decay=weight_average_decay)
    quiet = dict(progress=False, log=lambda *_: None)
    reference = Trainer([tiny_volume()], 2, tmp_path / "reference", config, **quiet)
    reference.run(resume=False)

    crashed = Trainer([tiny_volume()], 2, tmp_path / "resumed", config, **quiet)
    step = crashed.train_step

    def dies_in_the_second_epoch():
        if crashed.step == 3:       # after the checkpoint at step 2, before the next one
            raise RuntimeError("killed")
        return step()

    crashed.train_step = dies_in_the_second_epoch
    with pytest.raises(RuntimeError, match="killed"):
        crashed.run(resume=False)
    torch.manual_seed(123)          # the new process's generators start anywhere: the checkpoint must restore them
    resumed = Trainer([tiny_volume()], 2, tmp_path / "resumed", config, **quiet)
    assert resumed.try_resume() and resumed.step == 2
    resumed.run(resume=False)
    assert resumed.step == reference.step == 6
    for name, tensor in reference.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
    assert [{k: v for k, v in h.items()} for h in resumed.history] == reference.history
    if weight_average_decay:
        assert resumed.weight_average.updates == reference.weight_average.updates == 6
        for name, tensor in reference.weight_average.average.items():
            assert torch.equal(tensor, resumed.weight_average.average[name]), name


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from vemamba_iso.data import write_volume
    write_volume(tmp_path / "train.tif", tiny_volume())
    flags = ["--input", str(tmp_path / "train.tif"), "--factor", "2", "--steps", "30", "--steps-per-epoch", "2",
             "--dim", "8", "--groups", "1", "--blocks", "1", "--state-size", "4", "--patch", "4", "16",
             "--batch-size", "2", "--moco-steps", "2", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(folder, **kwargs):
        return subprocess.Popen([sys.executable, "-m", "vemamba_iso.cli.train", *flags, "--output", str(folder)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, **kwargs)

    killed = train(tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "checkpoint_last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 30          # killed part-way: the resume below has work left to do
    for folder in ("killed", "reference"):
        run = train(tmp_path / folder)
        assert run.wait(timeout=600) == 0, run.stderr.read().decode()[-2000:]
    resumed, _ = load_model(tmp_path / "killed")
    reference, _ = load_model(tmp_path / "reference")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert not [p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]   # no stale temporaries


def test_train_command_with_a_spent_time_limit_says_nothing_is_left(tmp_path, capsys):
    from vemamba_iso.cli.train import main
    from vemamba_iso.data import write_volume
    write_volume(tmp_path / "train.tif", tiny_volume())
    argv = ["--input", str(tmp_path / "train.tif"), "--factor", "2", "--output", str(tmp_path / "model"),
            "--steps", "1000", "--time-limit", "0.0001", "--steps-per-epoch", "500", "--dim", "8", "--groups", "1",
            "--blocks", "1", "--state-size", "4", "--patch", "4", "16", "--batch-size", "2", "--moco-steps", "2",
            "--threads", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "model written to" in first
    steps = json.loads((tmp_path / "model" / "metadata.json").read_text())["training"]["steps_done"]
    assert 1 <= steps < 1000        # stopped by the clock, after at least one step, with a model on disk
    assert main(argv) == 0          # the same command again: the time is spent
    again = capsys.readouterr().out
    assert "nothing left to train" in again and "model written" not in again
    assert json.loads((tmp_path / "model" / "metadata.json").read_text())["training"]["steps_done"] == steps
