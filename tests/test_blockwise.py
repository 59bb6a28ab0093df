"""Block-wise reconstruction of chunked volumes: coverage, formats, resume after SIGKILL, Dask, faults."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import zarr

from vemamba_iso.blockwise import BlockGrid, LinearInterpolation, VolumeSource, reconstruct_blockwise
from vemamba_iso.blockwise.stores import cast_like


def random_volume(shape=(18, 40, 36), seed=0):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def write_zarr(path, volume, ome_scale=None, chunks=(8, 16, 16)):
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0" if ome_scale else "raw", data=volume, chunks=chunks)
    if ome_scale:
        group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                       "datasets": [{"path": "0", "coordinateTransformations": [
                                           {"type": "scale", "scale": list(ome_scale)}]}]}]
    return str(path)


def expected_result(volume, factor=4, axis=0):
    return cast_like(LinearInterpolation(factor, axis)(volume), volume.dtype)


@pytest.mark.parametrize("factor,axis", [(1, 0), (3, 0), (4, 2)])
def test_blocks_cover_the_output_exactly_once(factor, axis):
    grid = BlockGrid((17, 30, 23), block=(5, 8, 7), halo=(2, 3, 0), factor=factor, axis=axis)
    hits = np.zeros(grid.output_shape, dtype=int)
    for block in grid:
        hits[block.out] += 1
        read_shape = [s.stop - s.start for s in block.read]
        read_shape[axis] *= factor
        kept = [c.stop - c.start for c in block.crop]
        assert kept == [o.stop - o.start for o in block.out]
        assert all(c.stop <= r for c, r in zip(block.crop, read_shape))
    assert (hits == 1).all()
    assert len(grid) == 4 * 4 * 4


def test_block_smaller_than_halo_is_refused():
    with pytest.raises(ValueError, match="smaller than the halo"):
        BlockGrid((10, 10, 10), block=(4, 8, 8), halo=(6, 2, 2))


@pytest.mark.parametrize("output_name", ["out.zarr", "out.h5"])
def test_blockwise_equals_whole_volume_and_keeps_voxel_size(tmp_path, output_name):
    volume = random_volume()
    source = VolumeSource(write_zarr(tmp_path / "in.zarr", volume, ome_scale=(40.0, 4.0, 4.0)))
    assert source.voxel_size == (40.0, 4.0, 4.0)
    out = reconstruct_blockwise(source, str(tmp_path / output_name), LinearInterpolation(4),
                                block=(5, 16, 16), halo=(2, 4, 4), progress=False)
    result = VolumeSource(out)
    np.testing.assert_array_equal(result.read((slice(None),) * 3), expected_result(volume))
    assert result.dtype == np.uint8
    assert result.voxel_size == (10.0, 4.0, 4.0)
    assert sorted(os.listdir(tmp_path)) == sorted(["in.zarr", output_name])   # no journal or working store left


def test_hdf5_input_needs_an_existing_key(tmp_path):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = random_volume()
        f["labels"] = random_volume()
    with pytest.raises(KeyError, match=r"choose one with --key"):
        VolumeSource(str(path))
    with pytest.raises(KeyError, match="no dataset 'volume'"):
        VolumeSource(str(path), key="volume")
    assert VolumeSource(str(path), key="raw").shape == (18, 40, 36)


@pytest.mark.parametrize("suffix", [".h5", ".tif"])
def test_a_closed_source_releases_its_file_and_reopens_on_read(tmp_path, suffix):
    import tifffile

    volume = random_volume()
    path = tmp_path / f"in{suffix}"
    if suffix == ".h5":
        with h5py.File(path, "w") as f:
            f["raw"] = volume
    else:
        tifffile.imwrite(path, volume, photometric="minisblack")
    region = (slice(2, 5), slice(None), slice(3, 9))

    def open_descriptors():
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve())
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    with VolumeSource(str(path)) as source:
        np.testing.assert_array_equal(source.read(region), volume[region])
        assert not sys.platform.startswith("linux") or open_descriptors() >= 1
    assert not sys.platform.startswith("linux") or open_descriptors() == 0
    if suffix == ".h5":
        with h5py.File(path, "a") as f:   # HDF5 refuses to write a file another handle keeps open
            f["extra"] = np.zeros(1)
    np.testing.assert_array_equal(source.read(region), volume[region])   # reopened for a later read
    source.close()


def test_faults_are_clear_and_write_nothing(tmp_path):
    source = VolumeSource(write_zarr(tmp_path / "in.zarr", random_volume()))
    existing = tmp_path / "out.zarr"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        reconstruct_blockwise(source, str(existing), LinearInterpolation(2), progress=False)
    with pytest.raises(PermissionError, match="choose another --output"):
        reconstruct_blockwise(source, "/proc/out.zarr", LinearInterpolation(2), progress=False)
    with pytest.raises(ValueError, match="smaller than the halo"):
        reconstruct_blockwise(source, str(tmp_path / "b.zarr"), LinearInterpolation(2), block=(2, 8, 8),
                              halo=(4, 2, 2), progress=False)
    flat = zarr.open_group(str(tmp_path / "flat.zarr"), mode="w", zarr_format=2)
    flat.create_array("raw", data=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="3 dimensions"):
        VolumeSource(str(tmp_path / "flat.zarr"))
    with pytest.raises(ValueError, match="unknown chunked-store format"):
        VolumeSource(str(tmp_path / "in.nii.gz"))
    assert sorted(os.listdir(tmp_path)) == ["flat.zarr", "in.zarr", "out.zarr"]
    assert os.listdir(existing) == []


def test_resume_with_other_parameters_is_refused(tmp_path):
    source = VolumeSource(write_zarr(tmp_path / "in.zarr", random_volume()))
    out = str(tmp_path / "out.zarr")
    journal = tmp_path / "out.zarr.journal"
    journal.mkdir()
    (journal / "params.json").write_text('{"factor": 8}')
    with pytest.raises(ValueError, match="different parameters"):
        reconstruct_blockwise(source, out, LinearInterpolation(4), progress=False)
    # --overwrite starts over
    reconstruct_blockwise(source, out, LinearInterpolation(4), block=(8, 20, 20), halo=(1, 1, 1),
                          overwrite=True, progress=False)
    assert not journal.exists()


SLOW_RUN = textwrap.dedent("""
    import sys, time
    from vemamba_iso.blockwise import LinearInterpolation, VolumeSource, reconstruct_blockwise

    class Slow(LinearInterpolation):
        def __call__(self, block):
            time.sleep(float(sys.argv[3]))
            return super().__call__(block)

    reconstruct_blockwise(VolumeSource(sys.argv[1]), sys.argv[2], Slow(4), block=(4, 12, 12), halo=(2, 3, 3),
                          progress=False)
""")


def test_killed_run_resumes_to_the_identical_result(tmp_path):
    volume = random_volume()
    source_path = write_zarr(tmp_path / "in.zarr", volume)
    script = tmp_path / "run.py"
    script.write_text(SLOW_RUN)
    out = str(tmp_path / "out.zarr")
    journal = tmp_path / "out.zarr.journal"
    proc = subprocess.Popen([sys.executable, str(script), source_path, out, "0.05"])
    deadline = time.time() + 60
    while time.time() < deadline and (not journal.exists() or len(list(journal.glob("*.done"))) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(journal.glob("*.done")))
    assert 5 <= done_before < 5 * 4 * 3, "the run was not interrupted in the middle"
    assert not os.path.exists(out)                     # never a partial output under the final name
    subprocess.run([sys.executable, str(script), source_path, out, "0"], check=True, timeout=120)
    np.testing.assert_array_equal(VolumeSource(out).read((slice(None),) * 3), expected_result(volume))
    assert not journal.exists() and not os.path.exists(out + ".partial.zarr")


def test_dask_local_cluster_equals_single_process(tmp_path):
    pytest.importorskip("distributed")
    volume = random_volume()
    source = VolumeSource(write_zarr(tmp_path / "in.zarr", volume))
    kwargs = dict(block=(6, 20, 18), halo=(2, 4, 4), progress=False)
    single = reconstruct_blockwise(source, str(tmp_path / "single.zarr"), LinearInterpolation(3), **kwargs)
    dask = reconstruct_blockwise(source, str(tmp_path / "dask.h5"), LinearInterpolation(3), scheduler="local",
                                 workers=2, **kwargs)
    np.testing.assert_array_equal(VolumeSource(single).read((slice(None),) * 3),
                                  VolumeSource(dask).read((slice(None),) * 3))


def test_local_dask_workers_share_the_cores_and_respect_omp_num_threads(monkeypatch):
    from vemamba_iso.blockwise.engine import local_worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [local_worker_threads(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert local_worker_threads(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert [local_worker_threads(n) for n in (1, 4)] == [3, 2]
