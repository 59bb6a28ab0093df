"""``vemamba_iso_degrade``: make an anisotropic stack from an isotropic volume, the way training does.

The volume is normalised with the scheme its dtype implies (as ``vemamba_iso_evaluate`` does when the
model names none), degraded along one axis with a named preset (:func:`~vemamba_iso.degradation.preset`),
and written back in the input dtype. The degraded axis is first cropped to a multiple of the factor, so
``n`` input slices give ``n // K`` output slices and the reconstruction has ``(n // K) * K`` slices: compare
it with the ground truth's first ``(n // K) * K`` slices along that axis.
"""
from __future__ import annotations

import sys

import numpy as np

from .common import CommandError, CommandParser, read_input, run_command
from ..data.io import DEFAULT_KEY
from .outputs import claim_volume_output, write_output_volume


def build_parser() -> CommandParser:
    """The command's arguments."""
    from ..degradation import PRESETS
    parser = CommandParser(
        prog="vemamba_iso_degrade",
        description="Degrade an isotropic (Z, Y, X) volume along one axis by a factor (simulated anisotropic "
                    "acquisition), written in the input's dtype. The axis is cropped to a multiple of the factor; "
                    "crop the ground truth the same way (its first n*K slices) before comparing.")
    parser.add_argument("--input", required=True, help="isotropic volume (TIFF, HDF5, Zarr, NIfTI) or 'sample' (the "
                        "shipped isotropic FIB-25 crop)")
    parser.add_argument("--factor", type=int, required=True, help="degradation factor K (>= 2)")
    parser.add_argument("--output", required=True, help="output volume; format from its extension")
    parser.add_argument("--degradation", default="subsample", choices=list(PRESETS),
                        help="degradation preset; use the one the model was trained with (the shipped model: "
                             "subsample, keep every K-th slice)")
    parser.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="axis to degrade in (Z, Y, X)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the noise/jitter (realistic preset)")
    parser.add_argument("--key", default=None, help="dataset key for HDF5/Zarr input")
    parser.add_argument("--output-key", default=DEFAULT_KEY, help="dataset key for HDF5/Zarr output")
    return parser


def run(args) -> int:
    """Degrade ``--input`` into ``--output``; returns 0."""
    from ..data.intensity import denormalize, normalize
    from ..data.io import rescaled_voxel_size
    from ..degradation import degrade_axial, preset

    if args.factor < 2:
        raise CommandError(f"--factor must be at least 2 (the anisotropy to simulate), got {args.factor}")
    claim_volume_output(args.output, args.overwrite, args.output_key)
    volume = read_input(args.input, args.key)
    data = np.moveaxis(volume.data, args.axis, 0)
    length = data.shape[0]
    kept = (length // args.factor) * args.factor
    if kept < 2 * args.factor:
        raise CommandError(f"axis {args.axis} of {args.input} has {length} voxels; at least {2 * args.factor} are "
                           f"needed for x{args.factor} (two degraded slices)")
    if kept != length:
        print(f"cropped axis {args.axis} from {length} to {kept} voxels (a multiple of {args.factor}); compare the "
              f"reconstruction with the ground truth's first {kept} voxels along that axis")
    normed, record = normalize(data[:kept])
    degraded = degrade_axial(normed, preset(args.degradation, args.factor), axis=0,
                             rng=np.random.default_rng(args.seed))
    out = np.ascontiguousarray(np.moveaxis(denormalize(degraded, record, data.dtype), 0, args.axis))
    voxel = rescaled_voxel_size(volume.voxel_size, args.axis, args.factor)
    write_output_volume(args.output, out, voxel, args.output_key, args.overwrite)
    print(f"wrote {args.output}: shape {out.shape} (Z, Y, X), dtype {out.dtype}, x{args.factor} {args.degradation} "
          f"along axis {args.axis}, voxel size {voxel}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``vemamba_iso_degrade``; returns the exit code."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
