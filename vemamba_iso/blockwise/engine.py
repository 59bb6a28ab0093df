"""Block-wise, resumable, optionally distributed reconstruction of volumes of any size.

Memory stays bounded by the block size: blocks are read with a halo, processed, cropped and written
one at a time (or a batch per worker). Finished blocks are journalled, so a run killed at any moment
and started again with the same arguments completes, with the same result as an uninterrupted run
(every block's result depends on its own input region only). With Dask (``scheduler``), workers read
and process blocks and the client alone writes: safe for every store format.

An OME-Zarr output can get a resolution pyramid (``pyramid_levels``): once every full-resolution
block is done, levels 1..N are built chunk by chunk in the working store (see :mod:`.pyramid`), each
journalled when complete, and only then is the output moved into place.
"""
from __future__ import annotations

import logging
import os
from typing import Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import pyramid
from .grid import Block, BlockGrid
from .journal import BlockJournal
from ..data.io import DEFAULT_KEY, rescaled_voxel_size
from .stores import (OME_ZARR_SUFFIX, VolumeSource, WorkingStore, cast_like, check_output_location,
                     is_ome_zarr_path, store_format)

log = logging.getLogger(__name__)


class BlockProcessor(Protocol):
    """What the engine needs from a reconstruction method.

    ``__call__`` maps a (Z, Y, X) block to float values with ``axis`` scaled by ``factor`` (every
    input slice becomes ``factor`` output slices); ``identity()`` is a JSON-able description (method,
    weights checksum, ...) recorded with the run so that a resume with another model is refused.
    """

    factor: int
    axis: int

    def identity(self) -> dict: ...

    def __call__(self, block: np.ndarray) -> np.ndarray: ...


def default_workers() -> int:
    """Dask workers for a local cluster: one per core, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def process_blocks(processor: BlockProcessor, source: VolumeSource, blocks: Sequence[Block], dtype,
                   torch_threads: int | None = None) -> list[tuple[Block, np.ndarray]]:
    """Read, process and crop ``blocks``; returns (block, output values in ``dtype``) pairs."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    outputs = run_processor(processor, [source.read(block.read) for block in blocks])
    results = []
    for block, values in zip(blocks, outputs):
        values = np.asarray(values)
        expected = tuple((s.stop - s.start) * (processor.factor if i == processor.axis else 1)
                         for i, s in enumerate(block.read))
        if values.shape != expected:
            raise ValueError(f"the processor returned {values.shape} for a {tuple(s.stop - s.start for s in block.read)} "
                             f"block; expected {expected} (factor {processor.factor} along axis {processor.axis})")
        results.append((block, cast_like(values[block.crop], dtype)))
    return results


def run_processor(processor: BlockProcessor, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``processor`` applied to each array, in order. Arrays of one shape go through its ``process_batch``
    together where it has one (one forward pass for several blocks: what a GPU needs to be busy); the
    others, and every array of a processor without it, one at a time."""
    process_batch = getattr(processor, "process_batch", None)
    if process_batch is None or len(arrays) < 2:
        return [processor(a) for a in arrays]
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(tuple(a.shape), []).append(i)
    outputs: list = [None] * len(arrays)
    for indices in by_shape.values():
        values = process_batch([arrays[i] for i in indices]) if len(indices) > 1 else [processor(arrays[indices[0]])]
        for i, v in zip(indices, values):
            outputs[i] = v
    return outputs


def plan_blocks(shape, output: str, factor: int, axis: int, block=(32, 128, 128), halo=(4, 16, 16),
                pyramid_levels: int = 0,
                output_key: str | None = None) -> tuple[BlockGrid, list[tuple[int, ...]], str]:
    """The block grid of an input of ``shape``, the shapes of its pyramid levels and the name of the
    working store's full-resolution array (:func:`zarr_array_name`): every error in the block, halo,
    pyramid and output-key arguments, raised before any data is read (the commands call it first)."""
    grid = BlockGrid(shape, block, halo, factor, axis)
    level_shapes = _check_pyramid(str(output).rstrip("/"), grid.output_shape, pyramid_levels)
    return grid, level_shapes, zarr_array_name(output, output_key, pyramid_levels)


def reconstruct_blockwise(source: VolumeSource, output: str, processor: BlockProcessor, *,
                          block=(32, 128, 128), halo=(4, 16, 16), overwrite: bool = False,
                          scheduler: str | None = None, workers: int | None = None, batch_size: int | None = None,
                          output_dtype=None, output_key: str | None = None, progress: bool = True,
                          pyramid_levels: int = 0) -> str:
    """Reconstruct ``source`` into ``output`` (Zarr/OME-Zarr or HDF5) block by block.

    Args:
        source: the input volume (Z, Y, X).
        output: ``.zarr`` directory or ``.h5`` file; written only when complete (a ``.partial.zarr``
            working store and a ``.journal`` folder of finished blocks sit beside it until then).
        processor: the reconstruction method (see :class:`BlockProcessor`).
        block, halo: core size and context per side, in input voxels (Z, Y, X).
        overwrite: replace an existing output / discard an unfinished run with other parameters.
        scheduler: None (this process), ``"local"`` (a Dask LocalCluster sized to the machine) or a
            Dask scheduler address (``tcp://host:8786``).
        workers: workers of the local cluster (default: one per core, at most 8).
        batch_size: blocks read and processed together, in this process or per Dask task (default 1 on a
            CPU, 4 for a CUDA processor); blocks of one shape go through one forward pass where the
            processor has a ``process_batch`` method. Memory grows with it.
        output_dtype: default: the input's dtype.
        output_key: the dataset (HDF5, default "data") or array (Zarr, default "0", OME-Zarr's name for the
            full-resolution level, recorded in the ``multiscales`` metadata) that holds the result. With
            ``pyramid_levels`` the levels are "0".."N", so another Zarr name is a ValueError.
        pyramid_levels: resolution levels to add below the full-resolution one (0: none). Level k is
            the 2x2x2 mean of level k - 1 (sizes rounded up, a border voxel averages the voxels that
            exist; integers rounded to nearest, ties to even), stored as OME-Zarr 0.4 datasets "1".."N"
            with the scale doubled per level. Needs an OME-Zarr output (``*.ome.zarr``); a ValueError
            before any work otherwise, or when a level would halve an axis of one voxel.
    Returns:
        the output path.
    """
    output = str(output).rstrip("/")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size (blocks read and processed together) must be at least 1, got {batch_size}")
    grid, level_shapes, array_name = plan_blocks(source.shape, output, processor.factor, processor.axis, block,
                                                 halo, pyramid_levels, output_key)
    dtype = np.dtype(output_dtype if output_dtype is not None else source.dtype)
    params = {"input": os.path.abspath(source.path), "key": source.key, "shape": list(source.shape),
              "block": list(grid.block), "halo": list(grid.halo), "factor": grid.factor, "axis": grid.axis,
              "dtype": dtype.str, "processor": processor.identity()}
    if pyramid_levels:   # only when used, so that runs without a pyramid keep their journal format
        params["pyramid_levels"] = int(pyramid_levels)
    if array_name != WorkingStore.ARRAY:
        params["array"] = array_name
    journal_dir = f"{output}.journal"
    if _finish_interrupted(output, journal_dir, params, grid):
        return output
    check_output_location(output, overwrite)
    if overwrite:
        _discard(journal_dir, output)      # start over; an old output is replaced only at the end
    journal = BlockJournal(journal_dir, params)
    done = journal.done() & {b.name for b in grid}
    voxel_size = rescaled_voxel_size(getattr(source, "voxel_size", None), grid.axis, 1 / grid.factor)
    chunks = tuple(min(b * (grid.factor if i == grid.axis else 1), s)
                   for i, (b, s) in enumerate(zip(grid.block, grid.output_shape)))
    store = WorkingStore(output, grid.output_shape, dtype, chunks, voxel_size, resume=bool(done),
                         array_name=array_name)
    pending = [b for b in grid if b.name not in done]
    if done:
        log.info("resuming: %d of %d blocks already done", len(grid) - len(pending), len(grid))
    bar = tqdm(total=len(grid), initial=len(grid) - len(pending), unit="block", disable=not progress,
               desc="reconstructing", dynamic_ncols=True)
    batch_size = batch_size or default_batch_size(processor)
    if batch_size > 1:   # blocks of one shape next to each other, so that a batch shares one forward pass
        pending.sort(key=lambda b: tuple(s.stop - s.start for s in b.read))
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    try:
        if scheduler is None:
            for batch in batches:
                for done_block, values in process_blocks(processor, source, batch, dtype):
                    _store_block(store, journal, done_block, values, bar)
        else:
            _run_dask(processor, source, batches, dtype, store, journal, bar, scheduler, workers)
    finally:
        bar.close()
    if pyramid_levels:
        _build_pyramid(store, journal, level_shapes, progress)
    path = store.finish(output_key or DEFAULT_KEY)
    journal.remove()
    return path


def zarr_array_name(output: str, output_key: str | None, pyramid_levels: int) -> str:
    """The name of the full-resolution array in the working store (and so in a Zarr output).

    "0" (OME-Zarr's level 0) unless a Zarr output names another; ValueError for a name a pyramid or Zarr
    cannot take.
    """
    if store_format(output) != "zarr" or output_key in (None, WorkingStore.ARRAY):
        return WorkingStore.ARRAY
    if pyramid_levels:
        raise ValueError(f"a pyramid stores its levels as '0'..'{pyramid_levels}': drop the output key "
                         f"{output_key!r} (the full resolution is '0') or drop the pyramid")
    if "/" in output_key or not output_key.strip():
        raise ValueError(f"the output key {output_key!r} must be a plain array name without '/', e.g. 'data'")
    return output_key


def _check_pyramid(output: str, shape, levels) -> list[tuple[int, ...]]:
    """Shapes of levels 0..``levels``; a ValueError naming the fix for an impossible request."""
    shapes = pyramid.pyramid_shapes(shape, levels)
    if levels and not is_ome_zarr_path(output):
        raise ValueError(f"{output}: pyramid levels are written as OME-Zarr multiscales only; name the output "
                         f"*{OME_ZARR_SUFFIX} or drop the pyramid option")
    return shapes


def _level_marker(level: int) -> str:
    return f"pyramid-level-{level}"


def _build_pyramid(store: WorkingStore, journal: BlockJournal, shapes, progress: bool) -> None:
    """Levels 1..N from level 0; a level not journalled as complete (a killed run) is rebuilt whole."""
    done = journal.done()
    rebuilt = False
    for level in range(1, len(shapes)):
        if _level_marker(level) in done and not rebuilt:
            continue
        rebuilt = True   # every later level depends on this one, so it is rebuilt too
        target = store.create_level(level, shapes[level])
        pyramid.build_level(store.level(level - 1), target, progress=progress, description=f"pyramid level {level}")
        journal.mark(_level_marker(level))     # only after the whole level is stored
    store.write_multiscales(len(shapes) - 1)


def _store_block(store, journal, block: Block, values: np.ndarray, bar) -> None:
    store.write(block.out, values)
    journal.mark(block.name)     # only after the data is stored
    bar.update(1)


def _discard(journal_dir: str, output: str) -> None:
    import shutil

    shutil.rmtree(journal_dir, ignore_errors=True)
    shutil.rmtree(f"{output}.partial.zarr", ignore_errors=True)


def _finish_interrupted(output: str, journal_dir: str, params: dict, grid: BlockGrid) -> bool:
    """A run killed after its output was moved into place but before its journal was removed."""
    if not (os.path.exists(output) and os.path.isdir(journal_dir)):
        return False
    try:
        journal = BlockJournal(journal_dir, params)
    except ValueError:
        return False
    if len(journal.done() & {b.name for b in grid}) < len(grid):
        return False
    _discard(journal_dir, output)
    return True


def local_worker_threads(workers: int) -> int:
    """Torch threads per local Dask worker: the cores shared out, capped by ``OMP_NUM_THREADS`` when set
    (on a machine that other jobs load, more threads than free cores slow the scan's small operations)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def default_batch_size(processor) -> int:
    """Blocks per batch: 4 for a processor on a CUDA device (one forward pass keeps a GPU busy), 1 on a CPU
    (several blocks at once would only raise the peak memory)."""
    return 4 if str(getattr(processor, "device", "cpu")).startswith("cuda") else 1


def _run_dask(processor, source, batches, dtype, store, journal, bar, scheduler, workers):
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise RuntimeError("distributed reconstruction needs Dask: pip install 'bioimage-mamba[dask]'") from exc
    cluster = None
    if scheduler == "local":
        n = workers or default_workers()
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        torch_threads = local_worker_threads(n)
    else:
        client = Client(scheduler)
        torch_threads = None
    try:
        processor_f = client.scatter(processor, broadcast=True)
        source_f = client.scatter(source, broadcast=True)
        futures = [client.submit(process_blocks, processor_f, source_f, batch, dtype, torch_threads, pure=False)
                   for batch in batches]
        for future in as_completed(futures):
            for block, values in future.result():
                _store_block(store, journal, block, values, bar)
            future.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
