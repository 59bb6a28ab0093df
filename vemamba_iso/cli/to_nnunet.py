"""``vemamba_iso_to_nnunet``: volumes (raw or reconstructed) + labels -> nnU-Net raw dataset."""
from __future__ import annotations

import os
import sys

from .common import CommandError, CommandParser, read_input, run_command
from .outputs import claim_file_output


def build_parser() -> CommandParser:
    """The command's arguments."""
    p = CommandParser(
        prog="vemamba_iso_to_nnunet",
        description="Cut volumes and their label volumes into an nnU-Net v2 raw dataset "
                    "(imagesTr/labelsTr as NIfTI + dataset.json), ready for nnUNetv2_plan_and_preprocess.")
    p.add_argument("--image", action="append", required=True, help="volume (TIFF/HDF5/Zarr/NIfTI; file.h5:key); repeat")
    p.add_argument("--labels", action="append", required=True, help="label volume of the same shape; one per --image")
    p.add_argument("--key", default=None, help="dataset key of every --image / --labels HDF5/Zarr file "
                                               "(or name it per file: file.h5:key)")
    p.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", required=True, help="dataset name, e.g. EMMito")
    p.add_argument("--label-names", nargs="+", default=["background", "foreground"],
                   help="class names, background first (default: background foreground)")
    p.add_argument("--label-values", type=int, nargs="+",
                   help="raw label values of classes 1.. (default: every non-zero voxel is class 1)")
    p.add_argument("--from-instances", action="store_true",
                   help="labels are instance ids (e.g. neurons): use their boundaries (membranes) as class 1")
    p.add_argument("--subvolume", type=int, nargs=3, default=[32, 256, 256], metavar=("Z", "Y", "X"),
                   help="case size in voxels (default 32 256 256)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out the last fraction of each volume along its last axis (X) as imagesTs/labelsTs, "
                        "a region spatially separate from the training cases (default 0: all cases train)")
    p.add_argument("--case-prefix", default=None,
                   help="case names PREFIX_0000, ... (default: --name); give datasets built from versions of one "
                        "stack (reconstructed, interpolated) the same prefix so their case names match")
    p.add_argument("--sparse-labels", type=int, default=None, metavar="K",
                   help="the labels are those of the original anisotropic stack (one slice per section) and the "
                        "image its xK reconstruction along Z: section j goes to slice j*K, the slices in between "
                        "get nnU-Net's 'ignore' label (added as the last class)")
    p.add_argument("--section-offset", type=int, default=0, metavar="O",
                   help="with --sparse-labels: section j goes to slice j*K + O instead; 0 for models trained with "
                        "--degradation subsample, (K - 1) // 2 for average_pool / realistic ones (a section "
                        "then stands for the mean of its K slices, centred there)")
    p.add_argument("--channel-name", default="EM")
    p.add_argument("--nnunet-raw", default=os.environ.get("nnUNet_raw"),
                   help="nnU-Net raw folder (default: $nnUNet_raw)")
    return p


def run(args) -> int:
    """Write the dataset folder (assembled under a temporary name, renamed when complete); returns 0."""
    from ..downstream.nnunet_dataset import (expand_sparse_labels, instance_boundaries, labels_to_classes,
                                             write_nnunet_dataset)
    if len(args.image) != len(args.labels):
        raise CommandError(f"{len(args.image)} --image but {len(args.labels)} --labels: give one label volume per "
                           "image")
    if not args.nnunet_raw:
        raise CommandError("no nnU-Net raw folder: set nnUNet_raw or pass --nnunet-raw")
    if os.path.exists(args.nnunet_raw) and not os.path.isdir(args.nnunet_raw):
        raise NotADirectoryError(f"--nnunet-raw {args.nnunet_raw} is a file, not a folder; choose another "
                                 "--nnunet-raw")
    # the dataset folder's own name is checked (an existing id needs --overwrite) by write_nnunet_dataset
    claim_file_output(os.path.join(args.nnunet_raw, f"Dataset{args.dataset_id:03d}_{args.name}"), True,
                      "--nnunet-raw")

    def pairs():
        for image_path, label_path in zip(args.image, args.labels):
            image, labels = read_input(image_path, args.key), read_input(label_path, args.key, image=False)
            classes = (instance_boundaries(labels.data) if args.from_instances
                       else labels_to_classes(labels.data, args.label_values))
            if args.sparse_labels:
                classes = expand_sparse_labels(classes, image.data.shape[0], args.sparse_labels,
                                               offset=args.section_offset, ignore=len(args.label_names))
            yield image.data, classes, image.voxel_size or labels.voxel_size

    label_names = args.label_names + (["ignore"] if args.sparse_labels else [])
    folder = write_nnunet_dataset(pairs(), args.nnunet_raw, args.dataset_id, args.name,
                                  subvolume=args.subvolume, channel_name=args.channel_name,
                                  label_names=label_names, overwrite=args.overwrite,
                                  test_fraction=args.test_fraction, case_prefix=args.case_prefix)
    n = len(os.listdir(os.path.join(folder, "labelsTr")))
    held_out = os.path.join(folder, "labelsTs")
    n_test = len(os.listdir(held_out)) if os.path.isdir(held_out) else 0
    print(f"wrote {folder} ({n} training cases, {n_test} test cases); next: nnUNetv2_plan_and_preprocess -d "
          f"{args.dataset_id} --verify_dataset_integrity")
    return 0


def main(argv=None) -> int:
    """Entry point of ``vemamba_iso_to_nnunet``; returns the exit code."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
