"""``vemamba_iso_interpolate``: the interpolation baseline as one command.

Upsamples the degraded axis of an anisotropic stack by linear or cubic interpolation, placing degraded
sample ``j`` at the same high-resolution coordinate as the model path does
(:func:`~vemamba_iso.degradation.sample_offset` of the degradation preset), so the output has the shape,
voxel size and slice alignment of ``vemamba_iso_predict``'s output and can replace it voxel for voxel.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ..cli import CommandError, _read, _run
from ..degradation import PRESETS, preset, sample_offset
from ..evaluation.baselines import METHODS, interpolate_axial


def _interpolate(argv) -> int:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--output-key", default="data", help="dataset key for HDF5/Zarr output")
    parser.add_argument("--dtype", default=None, help="output dtype (default: the input's)")
    args = parser.parse_args(argv)
    from ..data.intensity import denormalize, normalize
    from ..data.io import file_format, rescaled_voxel_size, write_volume

    if args.factor < 2:
        raise CommandError(f"--factor must be at least 2, got {args.factor}")
    file_format(args.output)
    volume = _read(args.input, args.key, sample="anisotropic")
    data = np.moveaxis(volume.data, args.axis, 0)
    if data.shape[0] < 2:
        raise CommandError(f"the coarse axis {args.axis} has {data.shape[0]} voxel(s); nothing to interpolate")
    offset = sample_offset(args.factor, preset(args.degradation, args.factor).downsampling)
    # normalise and write back like vemamba_iso_predict, so both outputs share dtype handling and rounding
    normed, record = normalize(data)
    result = interpolate_axial(normed, args.factor, offset, args.method)
    dtype = np.dtype(args.dtype) if args.dtype else data.dtype
    out = np.ascontiguousarray(np.moveaxis(denormalize(result, record, dtype), 0, args.axis))
    voxel = rescaled_voxel_size(volume.voxel_size, args.axis, 1 / args.factor)
    write_volume(args.output, out, voxel, key=args.output_key)
    print(f"wrote {args.output}: shape {out.shape} (Z, Y, X), dtype {out.dtype}, x{args.factor} {args.method} "
          f"along axis {args.axis}")
    return 0


def interpolate_main() -> int:
    sys.exit(_run(_interpolate, sys.argv[1:]))


if __name__ == "__main__":
    interpolate_main()
