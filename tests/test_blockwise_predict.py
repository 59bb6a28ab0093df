"""vemamba_iso_predict on chunked stores: block by block with a model, and its faults."""
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from vemamba_iso.blockwise import VolumeSource
from vemamba_iso.data import read_volume


def predict(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "vemamba_iso.cli.predict", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture()
def volume_store(tmp_path):
    volume = (np.random.default_rng(0).random((8, 40, 36)) * 255).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "in.zarr"), mode="w", zarr_format=2)
    group.create_array("raw", data=volume, chunks=(4, 16, 16))
    return tmp_path / "in.zarr", volume


def test_blockwise_predict_matches_whole_volume_prediction(tmp_path, tiny_model, volume_store):
    store, volume = volume_store
    whole = tmp_path / "whole.tif"
    import tifffile
    tifffile.imwrite(tmp_path / "in.tif", volume, photometric="minisblack")
    common = ["--model", str(tiny_model), "--tile", "8", "24", "24", "--overlap", "2", "6", "6", "--threads", "1"]
    assert predict("--input", str(tmp_path / "in.tif"), "--output", str(whole), *common).returncode == 0
    result = predict("--input", str(store), "--output", str(tmp_path / "out.zarr"), "--block", "4", "20", "20",
                     "--halo", "2", "6", "6", *common)
    assert result.returncode == 0, result.stderr
    blocks = VolumeSource(str(tmp_path / "out.zarr")).read((slice(None),) * 3)
    reference = read_volume(whole).data
    assert blocks.shape == reference.shape == (16, 40, 36) and blocks.dtype == np.uint8
    # same network, other tile seams: close, not identical
    assert np.abs(blocks.astype(int) - reference.astype(int)).mean() < 2.0
    # the same command again: the output exists, nothing is touched without --overwrite
    again = predict("--input", str(store), "--output", str(tmp_path / "out.zarr"), *common)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert predict("--input", str(store), "--output", str(tmp_path / "out.zarr"), "--overwrite",
                   *common).returncode == 0


def test_blockwise_predict_faults_write_nothing(tmp_path, tiny_model, volume_store):
    store, _ = volume_store
    out = tmp_path / "out.h5"
    wrong_factor = predict("--input", str(store), "--output", str(out), "--model", str(tiny_model), "--factor", "4")
    assert wrong_factor.returncode == 2 and "x2" in wrong_factor.stderr
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (tiny_model / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    (truncated / "metadata.json").write_bytes((tiny_model / "metadata.json").read_bytes())
    broken = predict("--input", str(store), "--output", str(out), "--model", str(truncated), "--block", "4", "16", "16",
                     "--halo", "1", "2", "2")
    assert broken.returncode == 2 and "truncated or corrupt" in broken.stderr
    small_block = predict("--input", str(store), "--output", str(out), "--model", str(tiny_model),
                          "--block", "2", "16", "16", "--halo", "4", "2", "2")
    assert small_block.returncode == 2 and "smaller than the halo" in small_block.stderr
    not_chunked = predict("--input", str(store), "--output", str(tmp_path / "out.nii.gz"), "--model", str(tiny_model),
                          "--block", "4", "16", "16")
    assert not_chunked.returncode == 2 and "block by block" in not_chunked.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.zarr", "truncated"]


def test_block_arguments_are_checked_before_the_input_is_read(tmp_path, tiny_model, volume_store, monkeypatch,
                                                               capsys):
    from vemamba_iso.blockwise import model_processor
    from vemamba_iso.cli import predict as predict_command

    store, _ = volume_store

    def no_pass(*args, **kwargs):
        raise AssertionError("the statistics pass ran before the arguments were checked")

    monkeypatch.setattr(model_processor, "volume_intensity_record", no_pass)
    for edit, message in ((["--block", "2", "16", "16", "--halo", "4", "2", "2"], "smaller than the halo"),
                          (["--pyramid", "1"], ".ome.zarr"),
                          (["--output", str(tmp_path / "o.ome.zarr"), "--pyramid", "1", "--output-key", "raw"],
                           "levels as '0'..'1'"),
                          (["--output-key", "a/b"], "without '/'")):
        code = predict_command.main(["--input", str(store), "--output", str(tmp_path / "o.zarr"),
                                     "--model", str(tiny_model), *edit])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "kept" not in err, err   # no journal: nothing said to be kept
    assert sorted(os.listdir(tmp_path)) == ["in.zarr"]


def test_blockwise_predict_takes_a_lone_model_file_and_makes_the_output_folder(tmp_path, tiny_model, volume_store):
    store, volume = volume_store
    lone = tmp_path / "elsewhere" / "renamed.pt"       # no metadata.json beside it
    lone.parent.mkdir()
    lone.write_bytes((tiny_model / "model.pt").read_bytes())
    out = tmp_path / "new" / "folder" / "out.zarr"
    result = predict("--input", str(store), "--output", f"{out}:raw", "--model", str(lone), "--block", "4", "20", "20",
                     "--halo", "2", "6", "6", "--threads", "1")
    assert result.returncode == 0, result.stderr
    # the chosen array name holds the result, and the OME metadata points readers to it
    group = zarr.open_group(str(out), mode="r")
    assert list(group.array_keys()) == ["raw"]
    assert group.attrs["multiscales"][0]["datasets"][0]["path"] == "raw"
    assert VolumeSource(str(out)).shape == group["raw"].shape == (volume.shape[0] * 2, *volume.shape[1:])


def test_blockwise_predict_writes_an_ome_zarr_pyramid_with_flip_averaging(tmp_path, tiny_model, volume_store):
    store, _ = volume_store
    common = ["--model", str(tiny_model), "--block", "4", "20", "20", "--halo", "2", "6", "6", "--threads", "1"]
    out = tmp_path / "out.ome.zarr"
    result = predict("--input", str(store), "--output", str(out), "--pyramid", "2", "--flip-average", *common)
    assert result.returncode == 0, result.stderr
    group = zarr.open_group(str(out), mode="r")
    [multiscale] = group.attrs["multiscales"]
    assert [d["path"] for d in multiscale["datasets"]] == ["0", "1", "2"]
    levels = [np.asarray(group[p][...]) for p in ("0", "1", "2")]
    assert [level.shape for level in levels] == [(16, 40, 36), (8, 20, 18), (4, 10, 9)]
    reference = levels[0].astype(np.float64).reshape(8, 2, 20, 2, 18, 2).mean(axis=(1, 3, 5))
    assert np.abs(levels[1].astype(np.float64) - reference).max() <= 0.5
    plain = predict("--input", str(store), "--output", str(tmp_path / "plain.zarr"), *common)
    assert plain.returncode == 0, plain.stderr
    # the eight lateral views of an untrained-for-symmetry network differ a little
    assert not np.array_equal(VolumeSource(str(tmp_path / "plain.zarr")).read((slice(None),) * 3), levels[0])
    wrong = predict("--input", str(store), "--output", str(tmp_path / "flat.zarr"), "--pyramid", "1", *common)
    assert wrong.returncode == 2 and ".ome.zarr" in wrong.stderr
    assert not (tmp_path / "flat.zarr").exists()


@pytest.mark.parametrize("dtype, scale", [(np.float32, 1.0), (np.float32, 255.0), (np.uint16, 255.0),
                                          (np.uint16, 4000.0)])
def test_statistics_pass_reads_in_bounded_pieces_and_decides_as_the_in_memory_path(tmp_path, monkeypatch,
                                                                                     dtype, scale):
    from vemamba_iso.blockwise import model_processor
    from vemamba_iso.data.intensity import input_scheme, normalize

    volume = (np.random.default_rng(2).random((9, 30, 20)) * scale).astype(dtype)
    group = zarr.open_group(str(tmp_path / "v.zarr"), mode="w", zarr_format=2)
    group.create_array("raw", data=volume, chunks=(9, 30, 20))   # one chunk: the whole volume
    source = VolumeSource(str(tmp_path / "v.zarr"))
    reads = []
    read = source.read
    monkeypatch.setattr(source, "read", lambda region: reads.append(region) or read(region))
    monkeypatch.setattr(model_processor, "STATISTICS_READ_VOXELS", 2 * 30 * 20 + 100)
    record = model_processor.volume_intensity_record(source, "RGBTo01Normalization")
    voxels = [np.prod([len(range(*s.indices(n))) for s, n in zip(r, volume.shape)]) for r in reads]
    assert max(voxels) <= 2 * 30 * 20 + 100 and sum(voxels) == volume.size
    scheme = input_scheme("RGBTo01Normalization", volume.dtype, volume.min(), volume.max())
    expected = normalize(volume, scheme)[1]
    assert record["scheme"] == expected["scheme"] == ("RGBTo01Normalization" if scale == 255.0
                                                      else "RescaleTo01Normalization")
    np.testing.assert_allclose([record["scale"], record["offset"]], [expected["scale"], expected["offset"]],
                               rtol=1e-6)


def test_blocks_of_one_shape_go_through_one_forward_pass_with_the_same_result(tmp_path, tiny_model, volume_store):
    from vemamba_iso.blockwise import reconstruct_blockwise
    from vemamba_iso.blockwise.engine import default_batch_size, run_processor
    from vemamba_iso.blockwise.model_processor import ModelProcessor, volume_intensity_record

    store, _ = volume_store
    source = VolumeSource(str(store))
    processor = ModelProcessor(str(tiny_model), intensity=volume_intensity_record(source, "RGBTo01Normalization"))
    calls = []
    batch = processor.process_batch
    processor.process_batch = lambda blocks: calls.append(len(blocks)) or batch(blocks)
    rng = np.random.default_rng(1)
    arrays = [rng.random(s).astype(np.float32) * 255 for s in ((4, 12, 12), (6, 12, 12), (4, 12, 12), (4, 12, 12))]
    outputs = run_processor(processor, arrays)
    assert calls == [3]     # the three 4 x 12 x 12 blocks together, the other one alone
    for a, y in zip(arrays, outputs):
        assert y.shape == (a.shape[0] * 2, *a.shape[1:])
        np.testing.assert_allclose(y, processor(a), rtol=0, atol=1e-3)

    kwargs = dict(block=(4, 16, 16), halo=(2, 4, 4), progress=False)
    assert default_batch_size(processor) == 1
    one = reconstruct_blockwise(source, str(tmp_path / "one.zarr"), processor, **kwargs)
    four = reconstruct_blockwise(source, str(tmp_path / "four.zarr"), processor, batch_size=4, **kwargs)
    assert max(calls[1:]) > 1      # the 4-block batches did share forward passes
    a, b = (VolumeSource(p).read((slice(None),) * 3).astype(int) for p in (one, four))
    assert np.abs(a - b).max() <= 1     # uint8 output: at most a rounding step apart
    processor.device = "cuda:0"
    assert default_batch_size(processor) == 4


def test_tiff_over_the_memory_budget_is_read_block_by_block(tmp_path, tiny_model, volume_store, monkeypatch):
    """A TIFF bigger than the (test-sized) budget is never loaded whole: it goes to the block-wise engine, each
    read is one block with its halo, and the result is the block-wise reconstruction of the same volume."""
    import tifffile
    from vemamba_iso.blockwise import stores
    from vemamba_iso.cli import predict as predict_command

    store, volume = volume_store
    tifffile.imwrite(tmp_path / "in.tif", volume, photometric="minisblack")
    model = ["--model", str(tiny_model), "--threads", "1"]
    blocks = ["--block", "4", "20", "20", "--halo", "2", "6", "6"]
    assert predict_command.main(["--input", str(store), "--output", str(tmp_path / "zarr_in.zarr"), *model,
                                 *blocks]) == 0

    sizes = []
    read = stores.VolumeSource.read

    def recording_read(self, region):
        values = read(self, region)
        sizes.append(values.size)
        return values

    def whole(*args, **kwargs):
        raise AssertionError("the whole TIFF was loaded")

    monkeypatch.setattr(stores.VolumeSource, "read", recording_read)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", whole)    # what reading it in memory does
    monkeypatch.setenv("VEMAMBA_ISO_MEMORY_BUDGET", str(volume.nbytes / 4 / 2 ** 30))   # a quarter of the volume
    # over the budget, without any block-wise flag: block-wise all the same
    assert predict_command.main(["--input", str(tmp_path / "in.tif"), "--output", str(tmp_path / "default.tif"),
                                 *model]) == 0
    sizes.clear()
    out = tmp_path / "tiff_in.tif"
    assert predict_command.main(["--input", str(tmp_path / "in.tif"), "--output", str(out), *model, *blocks]) == 0
    assert sizes and max(sizes) <= (4 + 2 * 2) * (20 + 2 * 6) * (20 + 2 * 6) < volume.size
    monkeypatch.undo()
    expected = VolumeSource(str(tmp_path / "zarr_in.zarr")).read((slice(None),) * 3)
    np.testing.assert_array_equal(tifffile.imread(out), expected)
    assert sorted(os.listdir(tmp_path)) == ["default.tif", "in.tif", "in.zarr", "tiff_in.tif", "zarr_in.zarr"]


def test_zarr_over_the_memory_budget_written_as_tiff_goes_block_by_block(tmp_path, tiny_model, volume_store,
                                                                         monkeypatch, capsys):
    import tifffile
    from vemamba_iso.cli import predict as predict_command

    store, volume = volume_store
    model = ["--model", str(tiny_model), "--threads", "1"]
    assert predict_command.main(["--input", str(store), "--output", str(tmp_path / "small.tif"), *model]) == 0

    def whole(*args, **kwargs):
        raise AssertionError("the whole input was loaded")

    monkeypatch.setattr(predict_command, "read_input", whole)
    monkeypatch.setenv("VEMAMBA_ISO_MEMORY_BUDGET", str(volume.nbytes / 4 / 2 ** 30))
    assert predict_command.main(["--input", str(store), "--output", str(tmp_path / "large.tif"), *model]) == 0
    assert tifffile.imread(tmp_path / "large.tif").shape == (volume.shape[0] * 2, *volume.shape[1:])
    code = predict_command.main(["--input", str(store), "--output", str(tmp_path / "large.nii.gz"), *model])
    assert code == 2 and "over the memory budget" in capsys.readouterr().err
    assert not (tmp_path / "large.nii.gz").exists()
