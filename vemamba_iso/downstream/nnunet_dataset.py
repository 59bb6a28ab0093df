"""Turn volumes and their label volumes into an nnU-Net v2 raw dataset.

Each (image, labels) pair is cut into sub-volumes (nnU-Net trains on cases; many cases from one stack
give it a proper train/validation split), written as NIfTI with the voxel size as spacing, with a
``dataset.json`` built by nnU-Net's own ``generate_dataset_json``. The result is ready for
``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity`` and our trainers.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import numpy as np


def cut_subvolumes(shape: Sequence[int], size: Sequence[int]) -> list[tuple[slice, ...]]:
    """Non-overlapping tiles of ``size`` covering ``shape`` (Z, Y, X); the last tile of an axis is shifted
    back to end at the border (so all tiles have the same size), an axis shorter than ``size`` is whole."""
    starts = []
    for n, s in zip(shape, size):
        s = min(int(s), int(n))
        axis_starts = list(range(0, n - s + 1, s))
        if axis_starts[-1] + s < n:
            axis_starts.append(n - s)
        starts.append([(a, a + s) for a in axis_starts])
    tiles = [()]
    for axis in starts:
        tiles = [t + (slice(a, b),) for t in tiles for a, b in axis]
    return tiles


def instance_boundaries(instances: np.ndarray) -> np.ndarray:
    """Binary boundary mask (uint8, 1 = boundary) of an instance label volume: voxels whose label
    differs from one of their 6 neighbours (e.g. membranes from dense neuron ids)."""
    boundary = np.zeros(instances.shape, dtype=bool)
    for axis in range(instances.ndim):
        lo = [slice(None)] * instances.ndim
        hi = [slice(None)] * instances.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        differs = instances[tuple(lo)] != instances[tuple(hi)]
        boundary[tuple(lo)] |= differs
        boundary[tuple(hi)] |= differs
    return boundary.astype(np.uint8)


def labels_to_classes(labels: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """Class indices (uint8) from a label volume: with ``values`` [v1, v2, ...] voxels equal to v_k become
    class k (others 0); without, every non-zero voxel becomes class 1 (e.g. 0/255 masks)."""
    if values is None:
        return (labels != 0).astype(np.uint8)
    classes = np.zeros(labels.shape, dtype=np.uint8)
    for k, v in enumerate(values, start=1):
        classes[labels == v] = k
    return classes


def write_nnunet_dataset(pairs, raw_root: str, dataset_id: int, name: str, *, subvolume=(32, 256, 256),
                         channel_name: str = "EM", label_names: Sequence[str] = ("background", "foreground"),
                         overwrite: bool = False, description: str = "") -> str:
    """Write ``Dataset{id:03d}_{name}`` under ``raw_root``; returns its path.

    Args:
        pairs: iterable of (image (Z, Y, X), class labels (Z, Y, X) with values < len(label_names),
            voxel size (z, y, x) in nm or None).
        subvolume: case size (Z, Y, X) in voxels.
    The folder is assembled under a temporary name and renamed when complete.
    """
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not name.replace("_", "").isalnum():
        raise ValueError(f"dataset name {name!r} must be letters, digits and underscores")
    folder = os.path.join(raw_root, f"Dataset{int(dataset_id):03d}_{name}")
    existing = [d for d in (os.listdir(raw_root) if os.path.isdir(raw_root) else [])
                if d.startswith(f"Dataset{int(dataset_id):03d}_")]
    if existing and not overwrite:
        raise FileExistsError(f"{raw_root} already holds {existing[0]} with id {dataset_id}; "
                              "choose another --dataset-id or pass --overwrite")
    os.makedirs(raw_root, exist_ok=True)
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "imagesTr"))
    os.makedirs(os.path.join(tmp, "labelsTr"))
    case = 0
    try:
        for i, (image, labels, voxel_size) in enumerate(pairs):
            if image.ndim != 3 or image.shape != labels.shape:
                raise ValueError(f"pair {i}: image {image.shape} and labels {labels.shape} must be 3D volumes of "
                                 "one shape (resample the labels to the image grid first)")
            if labels.max() >= len(label_names):
                raise ValueError(f"pair {i}: label value {int(labels.max())} has no name in {list(label_names)}")
            spacing = [float(v) for v in reversed(voxel_size)] if voxel_size is not None else [1.0, 1.0, 1.0]
            for tile in cut_subvolumes(image.shape, subvolume):
                case_id = f"{name}_{case:04d}"
                for array, path in ((image[tile], os.path.join(tmp, "imagesTr", f"{case_id}_0000.nii.gz")),
                                    (labels[tile].astype(np.uint8), os.path.join(tmp, "labelsTr", f"{case_id}.nii.gz"))):
                    itk = sitk.GetImageFromArray(np.ascontiguousarray(array))
                    itk.SetSpacing(spacing)
                    sitk.WriteImage(itk, path)
                case += 1
        if case == 0:
            raise ValueError("no (image, labels) pair was given")
        generate_dataset_json(tmp, {0: channel_name}, {n: k for k, n in enumerate(label_names)}, case, ".nii.gz",
                              dataset_name=f"Dataset{int(dataset_id):03d}_{name}", description=description,
                              license="see the source volumes")
        for old in existing:
            shutil.rmtree(os.path.join(raw_root, old))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
