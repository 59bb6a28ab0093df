"""``vemamba_iso_evaluate``: degrade an isotropic volume, reconstruct it, report PSNR/SSIM against baselines."""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path

from .common import CommandParser, add_device_args, check_factor, read_input, run_command, setup_torch
from .outputs import claim_file_output
from .predict import add_tiling_args


def build_parser() -> CommandParser:
    """The command's arguments."""
    parser = CommandParser(
        prog="vemamba_iso_evaluate",
        description="Degrade an isotropic volume along Z, reconstruct it with the model and with linear/cubic "
                    "interpolation, report PSNR/SSIM (3D and per XY/XZ/YZ plane) and orthogonal views.")
    parser.add_argument("--gt", required=True, help="isotropic (Z, Y, X) volume, or 'sample' for the shipped crop")
    parser.add_argument("--factor", type=int, required=True, help="degradation factor along Z")
    parser.add_argument("--model", default=None, help="model directory (default: the shipped FIB-25 model for --factor; x4 without --factor)")
    parser.add_argument("--key", default=None, help="dataset key for HDF5/Zarr input")
    parser.add_argument("--report", default=None, help="JSON report path (default: print only); the PNG goes "
                                                        "next to it with the same stem unless --figure is given")
    parser.add_argument("--figure", default=None, help="PNG of orthogonal views")
    add_tiling_args(parser)
    add_device_args(parser)
    return parser


def run(args) -> int:
    """Evaluate, print the report, write the report and figure when asked; returns 0."""
    setup_torch(args)
    from ..data.atomic import atomic_path
    from ..evaluation import evaluate_reconstruction, orthogonal_views
    from ..evaluation.evaluate import removed_slice_near_centre
    from ..training.checkpoint import default_model_dir, load_model
    figure = args.figure or (str(Path(args.report).with_suffix(".png")) if args.report else None)
    claim_file_output(args.report, args.overwrite, "--report")
    claim_file_output(figure, args.overwrite, "--figure" if args.figure else "--report's figure")
    volume = read_input(args.gt, args.key)
    network, metadata = load_model(args.model or default_model_dir(args.factor), device=args.device)
    check_factor(args.factor, metadata, args.model)
    report, volumes = evaluate_reconstruction(network, metadata, volume.data, tile=args.tile,
                                              overlap=args.overlap, device=args.device,
                                              flip_average=args.flip_average)
    report["settings"].update({"gt": str(args.gt), "model": str(args.model or "default (shipped)")})
    text = json.dumps(report, indent=2)
    print(text)
    # both files are written to temporaries first and renamed only once both exist
    with ExitStack() as outputs:
        if args.report:
            Path(outputs.enter_context(atomic_path(args.report, args.overwrite))).write_text(text)
        if figure:
            orthogonal_views(volumes, outputs.enter_context(atomic_path(figure, args.overwrite)),
                             title=f"x{args.factor} along Z: {Path(str(args.gt)).name}",
                             z_index=removed_slice_near_centre(report["settings"]["shape_zyx"][0], args.factor))
    return 0


def main(argv=None) -> int:
    """Entry point of ``vemamba_iso_evaluate``; returns the exit code."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
