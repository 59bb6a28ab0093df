"""Volume I/O, nnU-Net normalisation, lateral rotations and training pairs."""
import numpy as np
import pytest

from vemamba_iso.data import SUPPORTED, VolumeFormatError, read_volume, sample_path, write_volume
from vemamba_iso.data.intensity import denormalize, input_scheme, normalize
from vemamba_iso.data.sampling import LateralPairSampler, lateral_rotation, to_network_layout
from vemamba_iso.degradation import preset


@pytest.mark.parametrize("name", ["v.tif", "v.h5", "v.zarr", "v.nii.gz"])
def test_round_trip_keeps_data_and_voxel_size(tmp_path, name):
    data = np.random.default_rng(0).integers(0, 255, (5, 6, 7), dtype=np.uint8)
    path = write_volume(tmp_path / name, data, voxel_size=(40.0, 4.0, 5.0), key="raw")
    back = read_volume(path, key="raw" if name.endswith((".h5", ".zarr")) else None)
    assert np.array_equal(back.data, data) and back.data.dtype == np.uint8
    assert np.allclose(back.voxel_size, (40.0, 4.0, 5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind


def test_hdf5_key_in_path_and_missing_key_error(tmp_path):
    write_volume(tmp_path / "a.h5", np.zeros((3, 4, 4), np.float32), key="raw")
    assert read_volume(f"{tmp_path / 'a.h5'}:raw").data.shape == (3, 4, 4)
    with pytest.raises(VolumeFormatError, match=r"'missing' not found.*\['raw'\]"):
        read_volume(tmp_path / "a.h5", key="missing")


def test_unknown_format_and_2d_input_errors(tmp_path):
    with pytest.raises(VolumeFormatError, match="unknown volume format"):
        read_volume(tmp_path / "volume.xyz")
    import tifffile
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(VolumeFormatError, match="2D"):
        read_volume(tmp_path / "image.tif")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import tifffile

    def broken(path, data, **kwargs):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError):
        write_volume(tmp_path / "out.tif", np.zeros((2, 3, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_nnunet_normalisation_inverts(dtype):
    data = (np.random.default_rng(1).random((4, 5, 6)) * 200 + 10).astype(dtype)
    normed, record = normalize(data)
    assert normed.dtype == np.float32 and normed.min() >= 0 and normed.max() <= 1
    assert record["scheme"] == ("RGBTo01Normalization" if dtype == np.uint8 else "RescaleTo01Normalization")
    back = denormalize(normed, record, dtype)
    assert back.dtype == dtype and np.allclose(back, data, atol=1e-3)
    z, rec = normalize(data, "ZScoreNormalization")
    assert abs(z.mean()) < 1e-4 and np.allclose(denormalize(z, rec), data, atol=1e-2)


@pytest.mark.parametrize("dtype, low, high, expected", [
    (np.uint8, 0, 255, "RGBTo01Normalization"),
    (np.uint16, 3, 250, "RGBTo01Normalization"),        # 8-bit values in a 16-bit file
    (np.uint16, 0, 4000, "RescaleTo01Normalization"),
    (np.float32, 0.5, 230.0, "RGBTo01Normalization"),   # grey values stored as floats
    (np.float32, 0.0, 1.0, "RescaleTo01Normalization"),  # already in [0, 1]: / 255 would squash it
    (np.float32, -1.0, 100.0, "RescaleTo01Normalization"),
])
def test_input_scheme_brings_inputs_to_an_rgb_models_range(dtype, low, high, expected):
    assert input_scheme("RGBTo01Normalization", dtype, low, high) == expected
    assert input_scheme("ZScoreNormalization", dtype, low, high) == "ZScoreNormalization"
    assert input_scheme(None, np.uint8, 0, 255) == "RGBTo01Normalization"
    assert input_scheme(None, np.float32, 0, 255) == "RescaleTo01Normalization"


def test_eight_lateral_rotations_are_distinct_and_keep_z():
    v = np.random.default_rng(2).random((3, 4, 4))
    rotated = [lateral_rotation(v, i) for i in range(8)]
    assert len({r.tobytes() for r in rotated}) == 8
    for r in rotated:
        assert np.allclose(np.sort(r.reshape(3, -1), 1), np.sort(v.reshape(3, -1), 1))  # each Z slice kept


def test_lateral_pairs_degrade_a_lateral_axis():
    rng = np.random.default_rng(0)
    v = rng.random((20, 40, 40)).astype(np.float32)
    sampler = LateralPairSampler([v], preset("subsample", 4), low_res_length=4, lateral=8, seed=0)
    inputs, targets = sampler.batch(3)
    assert inputs.shape == (3, 1, 4, 8, 8) and targets.shape == (3, 1, 16, 8, 8)
    assert np.array_equal(inputs[:, :, :], targets[:, :, ::4])  # subsample keeps every 4th lateral line
    assert to_network_layout(np.zeros((2, 3, 4))).shape == (3, 2, 4)
    with pytest.raises(ValueError, match="too small"):
        LateralPairSampler([v[:, :10, :10]], preset("subsample", 4), 4, 8)


def test_shipped_samples_exist_and_are_attributed():
    iso, aniso = read_volume(sample_path()), read_volume(sample_path("anisotropic"))
    assert iso.data.shape == (64, 128, 128) and iso.data.dtype == np.uint8
    assert np.array_equal(aniso.data, iso.data[::4]) and aniso.voxel_size == (40.0, 10.0, 10.0)
    text = (sample_path().parent / "ATTRIBUTION.md").read_text()
    assert "CC BY 3.0" in text and "Takemura" in text
    assert ".tif" in SUPPORTED


def test_pairs_from_all_axes_include_axial_pairs():
    # A volume that varies only along Z: lateral pairs are flat along their degraded axis, axial ones are not.
    v = np.broadcast_to(np.random.default_rng(0).random(48)[:, None, None], (48, 40, 40)).astype(np.float32)
    lateral = LateralPairSampler([v], preset("subsample", 4), 4, 8, seed=0)
    every = LateralPairSampler([v], preset("subsample", 4), 4, 8, seed=0, pair_axes="all")
    varies = [np.ptp(every.target()[:, 0, 0]) > 0 for _ in range(60)]
    assert 5 < sum(varies) < 40
    assert not any(np.ptp(lateral.target()[:, 0, 0]) > 0 for _ in range(20))
    with pytest.raises(ValueError, match="pair_axes"):
        LateralPairSampler([v], preset("subsample", 4), 4, 8, pair_axes="z")


def test_rescaled_voxel_size_scales_one_axis_and_keeps_missing_metadata():
    from vemamba_iso.data import rescaled_voxel_size

    assert rescaled_voxel_size((40.0, 10.0, 10.0), 0, 1 / 4) == pytest.approx((10.0, 10.0, 10.0))
    assert rescaled_voxel_size((10.0, 10.0, 10.0), 2, 3) == pytest.approx((10.0, 10.0, 30.0))
    assert rescaled_voxel_size(None, 0, 4) is None
