"""``vemamba_iso_interpolate``: the interpolation baseline as one command.

Upsamples the degraded axis of an anisotropic stack by linear or cubic interpolation, placing degraded
sample ``j`` at the same high-resolution coordinate as the model path does
(:func:`~vemamba_iso.degradation.sample_offset` of the degradation preset), so the output has the shape,
voxel size and slice alignment of ``vemamba_iso_predict``'s output and can replace it voxel for voxel.
"""
from __future__ import annotations

import sys

import numpy as np

from .common import CommandError, CommandParser, numeric_dtype, read_input, run_command
from ..data.io import DEFAULT_KEY
from .outputs import claim_volume_output, write_output_volume


def build_parser() -> CommandParser:
    """The command's arguments."""
    from ..degradation import PRESETS
    from ..evaluation.baselines import METHODS
    parser = CommandParser(
        prog="vemamba_iso_interpolate",
        description="Upsample the coarse axis of an anisotropic (Z, Y, X) stack by interpolation (the baseline "
                    "of vemamba_iso_predict; same output shape and slice positions).")
    parser.add_argument("--input", required=True, help="anisotropic volume (TIFF, HDF5, Zarr, NIfTI) or 'sample' (the "
                        "shipped anisotropic FIB-25 crop)")
    parser.add_argument("--factor", type=int, required=True, help="upsampling factor K (>= 2)")
    parser.add_argument("--output", required=True, help="output volume; format from its extension")
    parser.add_argument("--method", default="linear", choices=list(METHODS))
    parser.add_argument("--degradation", default="subsample", choices=list(PRESETS),
                        help="how the stack was acquired / degraded; sets where each slice sits (subsample: at "
                             "the first of K output slices; average_pool/realistic: at the centre of its slab)")
    parser.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="coarse axis in (Z, Y, X)")
    parser.add_argument("--key", default=None, help="dataset key for HDF5/Zarr input")
    parser.add_argument("--output-key", default=DEFAULT_KEY, help="dataset key for HDF5/Zarr output")
    parser.add_argument("--dtype", type=numeric_dtype, default=None, help="output dtype (default: the input's)")
    return parser


def run(args) -> int:
    """Interpolate ``--input`` into ``--output``; returns 0."""
    from ..data.intensity import denormalize, normalize
    from ..data.io import rescaled_voxel_size
    from ..degradation import preset, sample_offset
    from ..evaluation.baselines import interpolate_axial

    if args.factor < 2:
        raise CommandError(f"--factor must be at least 2, got {args.factor}")
    claim_volume_output(args.output, args.overwrite, args.output_key)
    volume = read_input(args.input, args.key, sample="anisotropic")
    data = np.moveaxis(volume.data, args.axis, 0)
    if data.shape[0] < 2:
        raise CommandError(f"the coarse axis {args.axis} has {data.shape[0]} voxel(s); nothing to interpolate")
    offset = sample_offset(args.factor, preset(args.degradation, args.factor).downsampling)
    # normalise and write back like vemamba_iso_predict, so both outputs share dtype handling and rounding
    normed, record = normalize(data)
    result = interpolate_axial(normed, args.factor, offset, args.method)
    dtype = args.dtype if args.dtype is not None else data.dtype
    out = np.ascontiguousarray(np.moveaxis(denormalize(result, record, dtype), 0, args.axis))
    voxel = rescaled_voxel_size(volume.voxel_size, args.axis, 1 / args.factor)
    write_output_volume(args.output, out, voxel, args.output_key, args.overwrite)
    print(f"wrote {args.output}: shape {out.shape} (Z, Y, X), dtype {out.dtype}, x{args.factor} {args.method} "
          f"along axis {args.axis}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``vemamba_iso_interpolate``; returns the exit code."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
