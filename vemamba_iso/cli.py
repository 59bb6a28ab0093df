"""Command-line entry points: ``vemamba_iso_train``, ``vemamba_iso_predict``, ``vemamba_iso_evaluate``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


class CommandError(Exception):
    """An error the user can fix; printed without a traceback."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the network runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")


def _setup_torch(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was requested but no CUDA GPU is available; use --device cpu")


def _input_paths(entries: list[str]) -> list[str]:
    """Files as given; a directory (e.g. an nnUNet_raw dataset folder) contributes its volumes
    (from ``imagesTr`` when present); a bare dataset name is looked up under ``$nnUNet_raw``."""
    from .data.io import SUPPORTED
    paths = []
    for entry in entries:
        p = Path(entry)
        if not p.exists() and os.environ.get("nnUNet_raw") and (Path(os.environ["nnUNet_raw"]) / entry).is_dir():
            p = Path(os.environ["nnUNet_raw"]) / entry
        if p.is_dir() and not str(p).lower().endswith(".zarr"):
            folder = p / "imagesTr" if (p / "imagesTr").is_dir() else p
            found = sorted(str(f) for f in folder.iterdir() if str(f).lower().endswith(SUPPORTED))
            if not found:
                raise CommandError(f"no volumes ({', '.join(SUPPORTED)}) in {folder}")
            paths += found
        else:
            paths.append(entry)
    return paths


def _read(path: str, key: str | None, sample: str = "isotropic"):
    from .data.io import read_volume
    if path == "sample":
        from .data import sample_path
        path = str(sample_path(sample))
    volume = read_volume(path, key)
    if np.issubdtype(volume.data.dtype, np.floating) and not np.all(np.isfinite(volume.data)):
        raise CommandError(f"{path} contains NaN or infinite voxels; replace them (e.g. with the background "
                           "value) before reconstruction")
    return volume


def _run(main, argv):
    from .data.io import VolumeFormatError
    try:
        return main(argv)
    except (CommandError, VolumeFormatError, FileNotFoundError, FileExistsError, PermissionError, ValueError,
            KeyError) as error:
        print(f"error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        return 2


# -- train ------------------------------------------------------------------------------------------
def _train(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="vemamba_iso_train",
        description="Train VEMamba self-supervised on lateral degradations of anisotropic (Z, Y, X) volumes.")
    parser.add_argument("--input", action="append", required=True,
                        help="training volume (TIFF, HDF5, Zarr, NIfTI) or folder of volumes; repeatable")
    parser.add_argument("--key", default=None, help="dataset key inside HDF5/Zarr inputs")
    parser.add_argument("--factor", type=int, required=True, help="axial anisotropy factor to undo (2..10)")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--steps", type=int, default=2000, help="reconstruction training steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs=2, default=(8, 32), metavar=("AXIAL", "LATERAL"),
                        help="input patch: length along the degraded axis and lateral size (default 8 32)")
    parser.add_argument("--lr", type=float, default=4e-4, help="peak Adam learning rate")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="validation/checkpoint interval")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--no-degradation-encoder", action="store_true",
                        help="switch the MoCo degradation encoder and VDIM modulation off (ablation)")
    parser.add_argument("--moco-steps", type=int, default=200, help="degradation encoder pre-training steps")
    parser.add_argument("--degradation", default="subsample", choices=["subsample", "average_pool", "realistic"],
                        help="simulated axial degradation (must match how the stack was acquired)")
    parser.add_argument("--pair-axes", default="lateral", choices=["lateral", "all"],
                        help="axes degraded to make training pairs: 'lateral' (self-supervised, for anisotropic "
                             "stacks) or 'all' (also Z; only for isotropic training volumes such as FIB-SEM)")
    parser.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                        help="start from a trained model's weights where shapes match (e.g. a model for another "
                             "factor); ignored when resuming")
    parser.add_argument("--restart", action="store_true",
                        help="ignore an existing checkpoint_last.pt in --output instead of resuming")
    parser.add_argument("--seed", type=int, default=0)
    _add_common(parser)
    args = parser.parse_args(argv)
    _setup_torch(args)
    from .model import MAX_FACTOR, MIN_FACTOR
    if not MIN_FACTOR <= args.factor <= MAX_FACTOR:
        raise CommandError(f"--factor must be in {MIN_FACTOR}..{MAX_FACTOR}, got {args.factor}")
    from .training import Trainer, TrainingConfig
    volumes = [_read(p, args.key).data for p in _input_paths(args.input)]
    config = TrainingConfig(
        steps=args.steps, batch_size=args.batch_size, low_res_length=args.patch[0], lateral=args.patch[1],
        learning_rate=args.lr, warmup_steps=args.warmup_steps if args.warmup_steps is not None
        else max(1, args.steps // 20), steps_per_epoch=args.steps_per_epoch, moco_steps=args.moco_steps,
        degradation=args.degradation, pair_axes=args.pair_axes, seed=args.seed,
        network=dict(dim=args.dim, groups=args.groups, blocks=args.blocks, state_size=args.state_size,
                     use_degradation_encoder=not args.no_degradation_encoder))
    trainer = Trainer(volumes, args.factor, args.output, config, device=args.device)
    resumed = not args.restart and trainer.try_resume()
    if args.init_from and not resumed:
        trainer.initialise_from(args.init_from)
    metadata = trainer.run(resume=False)
    last = metadata["training"]["history"][-1] if metadata["training"]["history"] else {}
    print(f"model written to {Path(args.output) / 'model.pt'} ({metadata['training']['parameters']} parameters); "
          f"last validation: {last}")
    return 0


def train_main() -> int:
    sys.exit(_run(_train, sys.argv[1:]))


# -- predict ----------------------------------------------------------------------------------------
def _tiling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile", type=int, nargs=3, default=(24, 96, 96), metavar=("D", "H", "W"),
                        help="tile size in input voxels, degraded axis first (default 24 96 96; smaller tiles "
                             "use less memory, larger ones give the scans more context)")
    parser.add_argument("--overlap", type=int, nargs=3, default=(6, 24, 24), metavar=("D", "H", "W"),
                        help="tile overlap in input voxels (default 6 24 24)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tiles per forward pass (default 2); block-wise (Zarr/HDF5): blocks of one shape per "
                             "forward pass (default 4 on a GPU, 1 on a CPU)")
    parser.add_argument("--flip-average", action="store_true",
                        help="test-time augmentation: average the eight lateral symmetries (flips, Y/X swap) of each tile (8x slower)")


def _load(args):
    from .training.checkpoint import load_model
    network, metadata = load_model(args.model, device=args.device)
    return network, metadata


def _check_factor(requested: int | None, metadata: dict, model_arg) -> None:
    if requested is not None and int(requested) != int(metadata["factor"]):
        which = model_arg or "the default model"
        raise CommandError(f"--factor {requested} does not match {which}, trained for x{metadata['factor']}; "
                           f"train a x{requested} model with vemamba_iso_train --factor {requested} and pass --model")


def _predict(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="vemamba_iso_predict",
        description="Reconstruct an isotropic volume from an anisotropic (Z, Y, X) stack, Z being the coarse axis.")
    parser.add_argument("--input", required=True, help="anisotropic volume (TIFF, HDF5, Zarr, NIfTI) or 'sample' (the shipped"
                        " anisotropic FIB-25 crop)")
    parser.add_argument("--output", required=True, help="output volume; format from its extension")
    parser.add_argument("--model", default=None, help="model directory (default: the shipped FIB-25 x4 model)")
    parser.add_argument("--key", default=None, help="dataset key for HDF5/Zarr input")
    parser.add_argument("--output-key", default="data", help="dataset key for HDF5/Zarr output")
    parser.add_argument("--factor", type=int, default=None, help="expected factor; an error if the model differs")
    parser.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="degraded axis in (Z, Y, X)")
    parser.add_argument("--dtype", default=None, help="output dtype (default: the input's)")
    _tiling_args(parser)
    _add_common(parser)
    chunked = parser.add_argument_group(
        "large volumes", "Zarr/OME-Zarr/HDF5 input and output are reconstructed block by block (memory bounded by "
        "the block), resumably (run the same command again after an interruption), optionally on Dask")
    chunked.add_argument("--block", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                         help="block core in input voxels (default 32 128 128)")
    chunked.add_argument("--halo", type=int, nargs=3, default=(4, 16, 16), metavar=("Z", "Y", "X"),
                         help="context read around each block, input voxels (default 4 16 16)")
    chunked.add_argument("--scheduler", default=None,
                         help="'local' (a Dask cluster sized to this machine) or a Dask scheduler address")
    chunked.add_argument("--workers", type=int, default=None, help="workers of the local Dask cluster")
    chunked.add_argument("--overwrite", action="store_true", help="replace an existing output")
    chunked.add_argument("--pyramid", type=int, default=0, metavar="N",
                         help="add N resolution levels (2x2x2 means) to an .ome.zarr output, for napari, "
                              "neuroglancer or webKnossos (default 0)")
    args = parser.parse_args(argv)
    _setup_torch(args)
    if _is_blockwise(args):
        return _predict_blockwise(args)
    from .data.intensity import denormalize, normalize
    from .data.io import file_format, rescaled_voxel_size, write_volume
    from .inference import reconstruct_volume
    file_format(args.output)  # fail on an unknown output format before any work
    volume = _read(args.input, args.key, sample="anisotropic")
    network, metadata = _load(args)
    _check_factor(args.factor, metadata, args.model)
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
    scheme = metadata.get("normalisation", {}).get("scheme")
    try:
        normed, record = normalize(data, scheme)
    except ValueError:
        normed, record = normalize(data)
    result = reconstruct_volume(network, normed, tile=tuple(args.tile), overlap=tuple(args.overlap),
                                batch_size=args.batch_size or 2, device=args.device, flip_average=args.flip_average)
    out = np.moveaxis(denormalize(result, record, np.dtype(args.dtype) if args.dtype else data.dtype), 0, args.axis)
    voxel = rescaled_voxel_size(volume.voxel_size, args.axis, 1 / factor)
    write_volume(args.output, np.ascontiguousarray(out), voxel, key=args.output_key)
    print(f"wrote {args.output}: shape {out.shape} (Z, Y, X), dtype {out.dtype}, x{factor} along axis {args.axis}")
    return 0


def _is_blockwise(args) -> bool:
    from .data.io import file_format, split_key
    chunked = ("zarr", "hdf5")
    formats = [file_format(split_key(p)[0]) if p != "sample" else "tiff" for p in (args.input, args.output)]
    if args.block or args.scheduler:
        if not all(f in chunked for f in formats):
            raise CommandError("--block/--scheduler reconstruct chunked stores: use Zarr (.zarr) or HDF5 (.h5) for "
                               "both --input and --output")
        return True
    return all(f in chunked for f in formats)


def _predict_blockwise(args) -> int:
    from .blockwise import VolumeSource, reconstruct_blockwise
    from .blockwise.model_processor import ModelProcessor, volume_intensity_record
    from .data.intensity import default_scheme
    from .data.io import split_key
    from .blockwise.stores import is_ome_zarr_path
    if args.pyramid and not is_ome_zarr_path(args.output):
        raise CommandError(f"--pyramid writes OME-Zarr multiscales: name the output *.ome.zarr (got {args.output}) "
                           "or drop --pyramid")
    path, key = split_key(args.input, args.key)
    source = VolumeSource(str(path), key)
    # each block is one tile (--block bounds the memory; --tile applies to in-memory prediction)
    processor = ModelProcessor(args.model, intensity={}, axis=args.axis, device=args.device,
                               flip_average=args.flip_average)
    _check_factor(args.factor, processor.metadata, args.model)
    processor.network()   # load (and so validate) the weights before anything is written
    scheme = processor.metadata.get("normalisation", {}).get("scheme") or default_scheme(source.dtype)
    processor.intensity = volume_intensity_record(source, scheme)
    out = reconstruct_blockwise(source, args.output, processor, block=args.block or (32, 128, 128),
                                halo=args.halo, overwrite=args.overwrite, scheduler=args.scheduler,
                                workers=args.workers, batch_size=args.batch_size, output_dtype=args.dtype,
                                output_key=args.output_key, pyramid_levels=args.pyramid)
    print(f"wrote {out}: x{processor.factor} along axis {args.axis}, block by block")
    return 0


def predict_main() -> int:
    sys.exit(_run(_predict, sys.argv[1:]))


# -- evaluate ---------------------------------------------------------------------------------------
def _evaluate(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="vemamba_iso_evaluate",
        description="Degrade an isotropic volume along Z, reconstruct it with the model and with linear/cubic "
                    "interpolation, report PSNR/SSIM (3D and per XY/XZ/YZ plane) and orthogonal views.")
    parser.add_argument("--gt", required=True, help="isotropic (Z, Y, X) volume, or 'sample' for the shipped crop")
    parser.add_argument("--factor", type=int, required=True, help="degradation factor along Z")
    parser.add_argument("--model", default=None, help="model directory (default: the shipped FIB-25 x4 model)")
    parser.add_argument("--key", default=None, help="dataset key for HDF5/Zarr input")
    parser.add_argument("--report", default=None, help="JSON report path (default: print only); the PNG goes "
                                                        "next to it with the same stem unless --figure is given")
    parser.add_argument("--figure", default=None, help="PNG of orthogonal views")
    _tiling_args(parser)
    _add_common(parser)
    args = parser.parse_args(argv)
    _setup_torch(args)
    from .evaluation import evaluate_reconstruction, orthogonal_views
    volume = _read(args.gt, args.key)
    network, metadata = _load(args)
    _check_factor(args.factor, metadata, args.model)
    report, volumes = evaluate_reconstruction(network, metadata, volume.data, tile=tuple(args.tile),
                                              overlap=tuple(args.overlap), device=args.device,
                                              flip_average=args.flip_average)
    report["settings"].update({"gt": str(args.gt), "model": str(args.model or "default (shipped)")})
    text = json.dumps(report, indent=2)
    print(text)
    figure = args.figure or (str(Path(args.report).with_suffix(".png")) if args.report else None)
    if figure:
        from .evaluation.evaluate import removed_slice_near_centre
        orthogonal_views(volumes, figure, title=f"x{args.factor} along Z: {Path(str(args.gt)).name}",
                         z_index=removed_slice_near_centre(report["settings"]["shape_zyx"][0], args.factor))
    if args.report:
        from .training.checkpoint import _atomic
        _atomic(Path(args.report), lambda tmp: Path(tmp).write_text(text))
    return 0


def evaluate_main() -> int:
    sys.exit(_run(_evaluate, sys.argv[1:]))
