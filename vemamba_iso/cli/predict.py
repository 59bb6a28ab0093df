"""``vemamba_iso_predict``: reconstruct an isotropic volume from an anisotropic stack.

In memory for small volumes; block by block (memory bounded by the block, resumable) for chunked stores
(Zarr, OME-Zarr, HDF5) and for TIFF stacks larger than ``--memory-budget``.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .common import (CommandError, CommandParser, add_device_args, check_factor, non_negative_int, numeric_dtype,
                     positive_int, read_input, run_command, setup_torch)
from ..data.io import DEFAULT_KEY
from .outputs import claim_volume_output, write_output_volume

CHUNKED = ("zarr", "hdf5")


def add_tiling_args(parser) -> None:
    """``--tile``, ``--overlap``, ``--batch-size``, ``--flip-average`` (predict and evaluate)."""
    parser.add_argument("--tile", type=positive_int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="tile size in input voxels, degraded axis first (default: the model's training patch, "
                             "e.g. 8 32 32, where it reconstructs best; larger tiles were measured worse)")
    parser.add_argument("--overlap", type=non_negative_int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="tile overlap in input voxels (default: a quarter of the tile)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="tiles per forward pass (default 2 on a CPU, 32 on a GPU); block-wise (Zarr/HDF5): "
                             "blocks read and processed together (default 4 on a GPU, 1 on a CPU)")
    parser.add_argument("--flip-average", action="store_true",
                        help="test-time augmentation: average the eight lateral symmetries (flips, Y/X swap) of "
                             "each tile (8x slower)")


def build_parser() -> CommandParser:
    """The command's arguments."""
    parser = CommandParser(
        prog="vemamba_iso_predict",
        description="Reconstruct an isotropic volume from an anisotropic (Z, Y, X) stack, Z being the coarse axis.")
    parser.add_argument("--input", required=True, help="anisotropic volume (TIFF, HDF5, Zarr, NIfTI) or 'sample' "
                        "(the shipped anisotropic FIB-25 crop)")
    parser.add_argument("--output", required=True, help="output volume; format from its extension")
    parser.add_argument("--model", default=None, help="model directory (default: the shipped FIB-25 model for --factor; x4 without --factor)")
    parser.add_argument("--key", default=None, help="dataset key for HDF5/Zarr input")
    parser.add_argument("--output-key", default=None,
                        help="dataset key for HDF5/Zarr output (default 'data'; '0', OME-Zarr's full-resolution "
                             "level, for Zarr written block by block)")
    parser.add_argument("--factor", type=int, default=None, help="expected factor; an error if the model differs")
    parser.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="degraded axis in (Z, Y, X)")
    parser.add_argument("--dtype", type=numeric_dtype, default=None,
                        help="output dtype (default: the input's); values are kept, not rescaled: integers are "
                             "rounded and clipped to the dtype's range (uint16 input written as uint8 saturates "
                             "at 255)")
    add_tiling_args(parser)
    add_device_args(parser)
    chunked = parser.add_argument_group(
        "large volumes", "Zarr/OME-Zarr/HDF5 input and output, and TIFF input over --memory-budget, are "
        "reconstructed block by block (memory bounded by the block), resumably (run the same command again "
        "after an interruption), optionally on Dask")
    chunked.add_argument("--block", type=positive_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                         help="block core in input voxels (default 32 128 128)")
    chunked.add_argument("--halo", type=non_negative_int, nargs=3, default=(4, 16, 16), metavar=("Z", "Y", "X"),
                         help="context read around each block, input voxels (default 4 16 16)")
    chunked.add_argument("--scheduler", default=None,
                         help="'local' (a Dask cluster sized to this machine) or a Dask scheduler address")
    chunked.add_argument("--workers", type=positive_int, default=None, help="workers of the local Dask cluster")
    chunked.add_argument("--pyramid", type=non_negative_int, default=0, metavar="N",
                         help="add N resolution levels (2x2x2 means) to an .ome.zarr output, for napari, "
                              "neuroglancer or webKnossos (default 0)")
    chunked.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                         help="a TIFF input larger than this (GiB, uncompressed) is read block by block instead of "
                              "whole (default: $VEMAMBA_ISO_MEMORY_BUDGET, else 1/32 of this machine's memory)")
    return parser


def run(args) -> int:
    """Reconstruct ``--input`` into ``--output``; returns 0."""
    setup_torch(args)
    if _is_blockwise(args):
        return _predict_blockwise(args)
    from ..data.intensity import denormalize, input_scheme, normalize
    from ..data.io import rescaled_voxel_size
    from ..inference import reconstruct_volume
    from ..inference.tiling import tiles_per_pass
    from ..training.checkpoint import default_model_dir, load_model
    args.output_key = args.output_key or DEFAULT_KEY   # in memory: a group with this array, as interpolate/degrade write
    claim_volume_output(args.output, args.overwrite, args.output_key)
    volume = read_input(args.input, args.key, sample="anisotropic")
    network, metadata = load_model(args.model or default_model_dir(args.factor), device=args.device)
    check_factor(args.factor, metadata, args.model)
    factor = int(metadata["factor"])
    if volume.voxel_size is not None:
        lateral = [v for i, v in enumerate(volume.voxel_size) if i != args.axis]
        ratio = volume.voxel_size[args.axis] / max(min(lateral), 1e-12)
        if abs(ratio - factor) > 0.25 * factor:
            print(f"warning: the voxel size {volume.voxel_size} gives an anisotropy of {ratio:.2g} along axis "
                  f"{args.axis}, but the model upsamples x{factor}; the output voxel size will not be isotropic",
                  file=sys.stderr)
    data = np.moveaxis(volume.data, args.axis, 0)
    if data.shape[0] < 2:
        raise CommandError(f"the degraded axis {args.axis} has {data.shape[0]} voxel(s); nothing to interpolate")
    scheme = input_scheme(metadata.get("normalisation", {}).get("scheme"), data.dtype, data.min(), data.max())
    normed, record = normalize(data, scheme)
    result = reconstruct_volume(network, normed, tile=args.tile, overlap=args.overlap,
                                batch_size=args.batch_size or tiles_per_pass(args.device), device=args.device,
                                flip_average=args.flip_average)
    out = np.moveaxis(denormalize(result, record, args.dtype if args.dtype is not None else data.dtype), 0, args.axis)
    voxel = rescaled_voxel_size(volume.voxel_size, args.axis, 1 / factor)
    write_output_volume(args.output, np.ascontiguousarray(out), voxel, args.output_key, args.overwrite)
    print(f"wrote {args.output}: shape {out.shape} (Z, Y, X), dtype {out.dtype}, x{factor} along axis {args.axis}")
    return 0


def memory_budget_bytes(gib: float | None) -> int:
    """The input size above which a TIFF is read block by block: ``gib``, ``$VEMAMBA_ISO_MEMORY_BUDGET``
    (GiB) or 1/32 of the machine's memory (in-memory prediction needs some 30 bytes per input voxel)."""
    if gib is None and os.environ.get("VEMAMBA_ISO_MEMORY_BUDGET"):
        try:
            gib = float(os.environ["VEMAMBA_ISO_MEMORY_BUDGET"])
        except ValueError:
            raise CommandError(f"VEMAMBA_ISO_MEMORY_BUDGET={os.environ['VEMAMBA_ISO_MEMORY_BUDGET']!r} is not a "
                               "number of GiB; unset it or set e.g. 4") from None
    if gib is not None:
        if gib <= 0:
            raise CommandError(f"--memory-budget must be positive (GiB), got {gib}")
        return int(gib * 2 ** 30)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2 ** 30
    return total // 32


def _is_blockwise(args) -> bool:
    from ..data.io import file_format, split_key
    from ..blockwise.stores import tiff_nbytes
    formats = [file_format(split_key(p)[0]) if p != "sample" else "tiff" for p in (args.input, args.output)]
    if args.block or args.scheduler:
        if not (formats[0] in CHUNKED + ("tiff",) and formats[1] in CHUNKED + ("tiff",)):
            raise CommandError("--block/--scheduler reconstruct block by block: use Zarr (.zarr), HDF5 (.h5) or "
                               "TIFF for both --input and --output")
        return True
    size = None
    if formats[0] == "tiff" and args.input != "sample" and os.path.isfile(args.input):
        size = tiff_nbytes(args.input)
    elif formats[0] in CHUNKED and formats[1] not in CHUNKED:   # e.g. a large Zarr written as TIFF
        from ..blockwise import VolumeSource
        path, key = split_key(args.input, args.key)
        try:
            with VolumeSource(str(path), key) as source:
                size = int(np.prod(source.shape)) * np.dtype(source.dtype).itemsize
        except (KeyError, ValueError, OSError):
            return False   # a missing key or file: reading it in memory reports it as every command does
    if size is not None and size > memory_budget_bytes(args.memory_budget):
        if formats[1] not in CHUNKED + ("tiff",):
            raise CommandError(f"{args.input} ({size / 2 ** 30:.2f} GiB) is over the memory budget and is "
                               "reconstructed block by block: write a .zarr, .h5 or .tif --output, or raise "
                               "--memory-budget")
        return True
    return all(f in CHUNKED for f in formats)


def _predict_blockwise(args) -> int:
    from ..blockwise import VolumeSource
    from ..blockwise.stores import is_ome_zarr_path
    from ..data.io import split_key
    output, output_key = split_key(args.output, args.output_key)
    output = str(output)
    if args.pyramid and not is_ome_zarr_path(output):
        raise CommandError(f"--pyramid writes OME-Zarr multiscales: name the output *.ome.zarr (got {output}) "
                           "or drop --pyramid")
    if not os.path.isdir(f"{output.rstrip('/')}.journal"):   # else: the engine resumes or finishes it
        claim_volume_output(output, args.overwrite)
    path, key = split_key(args.input, args.key)
    with VolumeSource(str(path), key) as source:
        return _reconstruct_source(args, source, output, output_key)


def _reconstruct_source(args, source, output: str, output_key: str | None) -> int:
    """Block-wise reconstruction of an open ``source`` into ``output`` (checked and claimed by the caller)."""
    from ..blockwise import reconstruct_blockwise
    from ..blockwise.engine import plan_blocks
    from ..blockwise.model_processor import ModelProcessor, volume_intensity_record
    from ..data.intensity import default_scheme
    from ..inference.tiling import tiles_per_pass
    # --block bounds the memory; within a block the network runs on tiles (default: its training patch)
    from ..training.checkpoint import default_model_dir
    processor = ModelProcessor(args.model or default_model_dir(args.factor), intensity={}, axis=args.axis,
                               device=args.device, tile=args.tile,
                               overlap=args.overlap, flip_average=args.flip_average,
                               batch_size=tiles_per_pass(args.device))
    check_factor(args.factor, processor.metadata, args.model)
    block = args.block or (32, 128, 128)
    if args.scheduler:
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise CommandError("--scheduler needs Dask: pip install 'bioimage-mamba[dask]', or drop --scheduler "
                               "to reconstruct in this process") from None
    # the block, halo, pyramid and output-key arguments are checked before the pass over the whole input below
    plan_blocks(source.shape, output, processor.factor, args.axis, block, args.halo, args.pyramid, output_key)
    processor.network()   # load (and so validate) the weights before anything is written
    scheme = processor.metadata.get("normalisation", {}).get("scheme") or default_scheme(source.dtype)
    processor.intensity = volume_intensity_record(source, scheme)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)   # as the in-memory path does
    journal = f"{output.rstrip('/')}.journal"
    args.interrupt_note = (f"finished blocks are kept in {output}.partial.zarr and {journal}: run "
                           "the same command again to resume (or pass --overwrite to start over)")
    try:
        out = reconstruct_blockwise(source, output, processor, block=block,
                                    halo=args.halo, overwrite=args.overwrite, scheduler=args.scheduler,
                                    workers=args.workers, batch_size=args.batch_size, output_dtype=args.dtype,
                                    output_key=output_key, pyramid_levels=args.pyramid)
    except BaseException:
        if not os.path.isdir(journal):   # failed before the first block: nothing is kept to resume from
            del args.interrupt_note
        raise
    print(f"wrote {out}: x{processor.factor} along axis {args.axis}, block by block")
    return 0


def main(argv=None) -> int:
    """Entry point of ``vemamba_iso_predict``; returns the exit code."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
