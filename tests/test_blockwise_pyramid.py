"""OME-Zarr resolution pyramids of block-wise outputs: shapes, values, metadata, faults, resume."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from vemamba_iso.blockwise import LinearInterpolation, VolumeSource, reconstruct_blockwise
from vemamba_iso.blockwise import pyramid
from vemamba_iso.blockwise.stores import cast_like

BLOCKING = dict(block=(3, 8, 8), halo=(1, 2, 2), progress=False)


def write_input(tmp_path, shape=(5, 23, 21), voxel_size=(40.0, 4.0, 4.0), seed=0):
    volume = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "in.zarr"), mode="w", zarr_format=2)
    group.create_array("raw", data=volume, chunks=(4, 8, 8))
    if voxel_size is not None:
        group["raw"].attrs["voxel_size"] = list(voxel_size)
    return VolumeSource(str(tmp_path / "in.zarr")), volume


def reference_mean(level: np.ndarray) -> np.ndarray:
    """2x2x2 mean over the voxels that exist (NaN padding ignored by nanmean), rounded like level 0."""
    padded_shape = [s + s % 2 for s in level.shape]
    padded = np.full(padded_shape, np.nan)
    padded[tuple(slice(0, s) for s in level.shape)] = level
    windows = padded.reshape([n for s in padded_shape for n in (s // 2, 2)])
    return cast_like(np.nanmean(windows, axis=tuple(range(1, 2 * level.ndim, 2))), level.dtype)


def read_levels(path):
    group = zarr.open_group(str(path), mode="r")
    paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]
    return [np.asarray(group[p][...]) for p in paths]


def test_level_shapes_round_up_and_too_many_levels_are_refused():
    assert pyramid.pyramid_shapes((8, 24, 24), 3) == [(8, 24, 24), (4, 12, 12), (2, 6, 6), (1, 3, 3)]
    assert pyramid.pyramid_shapes((9, 23, 5), 2) == [(9, 23, 5), (5, 12, 3), (3, 6, 2)]
    assert pyramid.max_pyramid_levels((8, 24, 24)) == 3
    assert pyramid.max_pyramid_levels((9, 23, 5)) == 3    # 5 -> 3 -> 2 -> 1
    with pytest.raises(ValueError, match="at most 3 levels"):
        pyramid.pyramid_shapes((8, 24, 24), 4)
    with pytest.raises(ValueError, match=">= 0"):
        pyramid.pyramid_shapes((8, 24, 24), -1)


@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 7, 3), (3, 1, 9)])
def test_downsample_mean_equals_reference_for_odd_and_even_sizes(shape):
    rng = np.random.default_rng(1)
    as_int = rng.integers(-300, 300, size=shape).astype(np.int16)
    result = pyramid.downsample_mean(as_int)
    assert result.dtype == np.int16 and result.shape == pyramid.downsampled_shape(shape)
    np.testing.assert_array_equal(result, reference_mean(as_int))
    as_float = rng.random(shape).astype(np.float32)
    np.testing.assert_allclose(pyramid.downsample_mean(as_float), reference_mean(as_float), rtol=1e-6)
    # 2D uses the same code: 2x2 windows
    np.testing.assert_array_equal(pyramid.downsample_mean(as_int[0]), reference_mean(as_int[0]))


def test_integer_means_round_half_to_even():
    assert pyramid.downsample_mean(np.array([[[0, 1], [0, 0]], [[0, 0], [2, 1]]], np.uint8)).item() == 0  # 0.5
    assert pyramid.downsample_mean(np.array([[[3, 0, 5]]], np.uint8)).tolist() == [[[2, 5]]]     # 1.5 -> 2


@pytest.mark.parametrize("output_dtype", ["uint8", "float32"])
def test_levels_are_the_mean_of_the_previous_level(tmp_path, output_dtype):
    source, volume = write_input(tmp_path)          # output (10, 23, 21): odd Y and X
    out = reconstruct_blockwise(source, str(tmp_path / "out.ome.zarr"), LinearInterpolation(2),
                                output_dtype=output_dtype, pyramid_levels=3, **BLOCKING)
    levels = read_levels(out)
    assert [lv.shape for lv in levels] == [(10, 23, 21), (5, 12, 11), (3, 6, 6), (2, 3, 3)]
    assert all(lv.dtype == np.dtype(output_dtype) for lv in levels)
    np.testing.assert_array_equal(levels[0], cast_like(LinearInterpolation(2)(volume), output_dtype))
    for finer, coarser in zip(levels, levels[1:]):
        np.testing.assert_allclose(coarser, reference_mean(finer), rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["in.zarr", "out.ome.zarr"]    # no journal or working store left


def test_multiscales_metadata_lists_every_level(tmp_path):
    source, _ = write_input(tmp_path)
    single = reconstruct_blockwise(source, str(tmp_path / "single.ome.zarr"), LinearInterpolation(2), **BLOCKING)
    multi = reconstruct_blockwise(source, str(tmp_path / "multi.ome.zarr"), LinearInterpolation(2),
                                  pyramid_levels=2, **BLOCKING)
    [one] = zarr.open_group(single, mode="r").attrs["multiscales"]
    [many] = zarr.open_group(multi, mode="r").attrs["multiscales"]
    assert many["version"] == "0.4" and many["axes"] == one["axes"]
    assert [a["unit"] for a in many["axes"]] == ["nanometer"] * 3
    assert [d["path"] for d in many["datasets"]] == ["0", "1", "2"]
    assert many["datasets"][0] == one["datasets"][0]
    group = zarr.open_group(multi, mode="r")
    for level, dataset in enumerate(many["datasets"]):
        assert dataset["path"] in group
        scale, *translation = dataset["coordinateTransformations"]
        assert scale["type"] == "scale"
        assert scale["scale"] == [v * 2 ** level for v in (20.0, 4.0, 4.0)]
        if level:   # the mean of 2**level voxels sits at their centre
            assert translation == [{"type": "translation",
                                    "translation": [v * (2 ** level - 1) / 2 for v in (20.0, 4.0, 4.0)]}]
        else:
            assert translation == []
    # the output still reads as a volume: level 0 and its voxel size
    result = VolumeSource(multi)
    assert result.shape == (10, 23, 21) and result.voxel_size == (20.0, 4.0, 4.0)


def test_pyramid_needs_an_ome_zarr_output_and_writes_nothing_otherwise(tmp_path):
    source, _ = write_input(tmp_path)
    for name in ("out.zarr", "out.h5"):
        with pytest.raises(ValueError, match=r"\*\.ome\.zarr or drop the pyramid option"):
            reconstruct_blockwise(source, str(tmp_path / name), LinearInterpolation(2), pyramid_levels=1, **BLOCKING)
    with pytest.raises(ValueError, match="at most 4 levels"):    # output (10, 23, 21): 10 -> 5 -> 3 -> 2 -> 1
        reconstruct_blockwise(source, str(tmp_path / "out.ome.zarr"), LinearInterpolation(2), pyramid_levels=5,
                              **BLOCKING)
    assert os.listdir(tmp_path) == ["in.zarr"]


class CountingInterpolation(LinearInterpolation):
    calls = 0

    def __call__(self, block):
        CountingInterpolation.calls += 1
        return super().__call__(block)


def test_run_interrupted_during_pyramid_build_resumes_to_the_same_pyramid(tmp_path, monkeypatch):
    source, _ = write_input(tmp_path)
    blocking = dict(BLOCKING, block=(3, 4, 4))    # small chunks: level 2 (3, 6, 6) has 4 of them
    reference = read_levels(reconstruct_blockwise(source, str(tmp_path / "ref.ome.zarr"), LinearInterpolation(2),
                                                  pyramid_levels=3, **blocking))
    out = str(tmp_path / "out.ome.zarr")
    journal = tmp_path / "out.ome.zarr.journal"
    real_build, real_mean = pyramid.build_level, pyramid.downsample_mean
    built = []

    def build_then_die_in_level_2(previous, target, **kwargs):
        level = len(built) + 1
        built.append(level)
        if level == 2:   # die halfway through level 2: some of its chunks are written, the level is not marked
            calls = []

            def mean_then_die(*args, **kw):
                calls.append(1)
                if len(calls) > 2:
                    raise KeyboardInterrupt("killed")
                return real_mean(*args, **kw)

            monkeypatch.setattr(pyramid, "downsample_mean", mean_then_die)
        return real_build(previous, target, **kwargs)

    monkeypatch.setattr(pyramid, "build_level", build_then_die_in_level_2)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_blockwise(source, out, CountingInterpolation(2), pyramid_levels=3, **blocking)
    assert not os.path.exists(out)                          # never a partial output under the final name
    assert (journal / "pyramid-level-1.done").exists() and not (journal / "pyramid-level-2.done").exists()
    assert zarr.open_group(out + ".partial.zarr", mode="r")["2"].nchunks_initialized > 0
    # a restart with another number of levels is detected
    with pytest.raises(ValueError, match=r"different parameters \(pyramid_levels\)"):
        reconstruct_blockwise(source, out, LinearInterpolation(2), pyramid_levels=2, **blocking)
    with pytest.raises(ValueError, match=r"different parameters \(pyramid_levels\)"):
        reconstruct_blockwise(source, out, LinearInterpolation(2), **blocking)

    monkeypatch.setattr(pyramid, "downsample_mean", real_mean)
    built.clear()
    monkeypatch.setattr(pyramid, "build_level", lambda *a, **kw: (built.append(len(built) + 2), real_build(*a, **kw)))
    CountingInterpolation.calls = 0
    reconstruct_blockwise(source, out, CountingInterpolation(2), pyramid_levels=3, **blocking)
    assert CountingInterpolation.calls == 0      # every full-resolution block was journalled
    assert built == [2, 3]                       # level 1 was complete; level 2 is rebuilt whole, then 3
    result = read_levels(out)
    assert len(result) == len(reference) == 4
    for got, expected in zip(result, reference):
        np.testing.assert_array_equal(got, expected)
    assert not journal.exists() and not os.path.exists(out + ".partial.zarr")


SLOW_PYRAMID_RUN = textwrap.dedent("""
    import sys, time
    from vemamba_iso.blockwise import LinearInterpolation, VolumeSource, reconstruct_blockwise, pyramid

    real_mean = pyramid.downsample_mean

    def slow_mean(*args, **kwargs):
        time.sleep(float(sys.argv[3]))
        return real_mean(*args, **kwargs)

    pyramid.downsample_mean = slow_mean
    reconstruct_blockwise(VolumeSource(sys.argv[1]), sys.argv[2], LinearInterpolation(2), block=(3, 4, 4),
                          halo=(1, 2, 2), progress=False, pyramid_levels=3)
""")


def test_sigkill_during_pyramid_build_then_rerun_gives_the_uninterrupted_result(tmp_path):
    source, _ = write_input(tmp_path)
    reference = read_levels(reconstruct_blockwise(source, str(tmp_path / "ref.ome.zarr"), LinearInterpolation(2),
                                                  pyramid_levels=3, **dict(BLOCKING, block=(3, 4, 4))))
    script = tmp_path / "run.py"
    script.write_text(SLOW_PYRAMID_RUN)
    out = str(tmp_path / "out.ome.zarr")
    level_1_done = tmp_path / "out.ome.zarr.journal" / "pyramid-level-1.done"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), source.path, out, "0.2"], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not level_1_done.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert level_1_done.exists(), "the run was not killed during the pyramid build"
    assert not os.path.exists(out)
    subprocess.run([sys.executable, str(script), source.path, out, "0"], env=env, check=True, timeout=120)
    for got, expected in zip(read_levels(out), reference, strict=True):
        np.testing.assert_array_equal(got, expected)
