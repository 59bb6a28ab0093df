"""Turn volumes and their label volumes into an nnU-Net v2 raw dataset.

Each (image, labels) pair is cut into sub-volumes (nnU-Net trains on cases; many cases from one stack
give it a proper train/validation split), written as NIfTI with the voxel size as spacing, with a
``dataset.json`` built by nnU-Net's own ``generate_dataset_json``. The result is ready for
``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity`` and our trainers.
"""
from __future__ import annotations

import contextlib
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


def expand_sparse_labels(classes: np.ndarray, length: int, every: int, offset: int = 0,
                         ignore: int | None = None) -> np.ndarray:
    """Place labels drawn on the coarse sections of an anisotropic stack onto its reconstructed grid.

    Args:
        classes: (z, Y, X) class labels, one slice per acquired section.
        length: number of slices (axis 0) of the reconstructed image.
        every: reconstruction factor K: section ``j`` is image slice ``j * every + offset``.
        offset: image slice of section 0 (0 for subsampled acquisitions, as the models place them).
        ignore: value of the slices in between (default ``classes.max() + 1``), to be declared as
            nnU-Net's ``ignore`` label (the highest label value), so training and evaluation skip them.
    Returns:
        (length, Y, X) uint8.
    """
    if every < 1 or not 0 <= offset < every:
        raise ValueError(f"need every >= 1 and 0 <= offset < every, got every={every}, offset={offset}")
    expected = (length - offset + every - 1) // every
    if classes.shape[0] != expected:
        raise ValueError(f"{classes.shape[0]} labelled sections do not fit an image of {length} slices with one "
                         f"section every {every} slices from slice {offset} ({expected} sections): give the labels "
                         f"of the original stack and its reconstruction")
    ignore = int(classes.max()) + 1 if ignore is None else int(ignore)
    out = np.full((length, *classes.shape[1:]), ignore, dtype=np.uint8)
    out[offset::every] = classes
    return out


def split_last_axis(length: int, test_fraction: float) -> int:
    """Start index along the last axis of the held-out (test) region: the last ``test_fraction`` of
    ``length`` voxels, rounded, at least one voxel on each side when the fraction is > 0."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"the test fraction must be in [0, 1), got {test_fraction}")
    if test_fraction == 0:
        return length
    if length < 2:
        raise ValueError(f"the last axis has {length} voxel(s): too short to hold out a test region")
    return int(min(max(length - round(test_fraction * length), 1), length - 1))


def split_cases(shape: Sequence[int], size: Sequence[int], test_fraction: float = 0.0):
    """(training tiles, test tiles) of a volume of ``shape`` (Z, Y, X): the last ``test_fraction`` of the
    last axis is held out and tiled on its own, so no test tile overlaps a training tile (a spatially
    separate region, not cubes interleaved with the training ones). Tiles as in :func:`cut_subvolumes`;
    test tiles are narrower than ``size`` along the last axis when the held-out region is."""
    start = split_last_axis(int(shape[-1]), test_fraction)

    def shifted(tiles, by):
        return [t[:-1] + (slice(t[-1].start + by, t[-1].stop + by),) for t in tiles]

    train = cut_subvolumes((*shape[:-1], start), size)
    test = shifted(cut_subvolumes((*shape[:-1], shape[-1] - start), size), start) if start < shape[-1] else []
    return train, test


def write_nnunet_dataset(pairs, raw_root: str, dataset_id: int, name: str, *, subvolume=(32, 256, 256),
                         channel_name: str = "EM", label_names: Sequence[str] = ("background", "foreground"),
                         overwrite: bool = False, description: str = "", test_fraction: float = 0.0,
                         case_prefix: str | None = None) -> str:
    """Write ``Dataset{id:03d}_{name}`` under ``raw_root``; returns its path.

    Args:
        pairs: iterable of (image (Z, Y, X), class labels (Z, Y, X) with values < len(label_names),
            voxel size (z, y, x) in nm or None).
        subvolume: case size (Z, Y, X) in voxels.
        test_fraction: the last fraction of each volume along its last axis (X) goes to ``imagesTs`` /
            ``labelsTs`` (see :func:`split_cases`); ``numTraining`` counts the training cases only.
        case_prefix: case names are ``{case_prefix}_{index:04d}`` (default: ``name``). Volumes of one shape
            give the same case names and regions whatever the dataset, so datasets built from reconstructed
            and interpolated versions of a stack share their split.
    The folder is assembled under a temporary name and renamed when complete.
    """
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    case_prefix = name if case_prefix is None else case_prefix
    for what, text in (("dataset name", name), ("case prefix", case_prefix)):
        if not text.replace("_", "").isalnum():
            raise ValueError(f"{what} {text!r} must be letters, digits and underscores")
    split_last_axis(2, test_fraction)  # check the fraction before anything is written
    folder = os.path.join(raw_root, f"Dataset{int(dataset_id):03d}_{name}")
    existing = [d for d in (os.listdir(raw_root) if os.path.isdir(raw_root) else [])
                if d.startswith(f"Dataset{int(dataset_id):03d}_")]
    if existing and not overwrite:
        raise FileExistsError(f"{raw_root} already holds {existing[0]} with id {dataset_id}; "
                              "choose another --dataset-id or pass --overwrite")
    created = _missing_folders(raw_root)
    os.makedirs(raw_root, exist_ok=True)
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_fraction > 0 else ()):
        os.makedirs(os.path.join(tmp, sub))
    case = training = 0
    try:
        for i, (image, labels, voxel_size) in enumerate(pairs):
            if image.ndim != 3 or image.shape != labels.shape:
                raise ValueError(f"pair {i}: image {image.shape} and labels {labels.shape} must be 3D volumes of "
                                 "one shape (resample the labels to the image grid first)")
            if labels.max() >= len(label_names):
                raise ValueError(f"pair {i}: label value {int(labels.max())} has no name in {list(label_names)}")
            spacing = [float(v) for v in reversed(voxel_size)] if voxel_size is not None else [1.0, 1.0, 1.0]
            train_tiles, test_tiles = split_cases(image.shape, subvolume, test_fraction)
            for tile, part in [(t, "Tr") for t in train_tiles] + [(t, "Ts") for t in test_tiles]:
                case_id = f"{case_prefix}_{case:04d}"
                for array, path in ((image[tile], os.path.join(tmp, f"images{part}", f"{case_id}_0000.nii.gz")),
                                    (labels[tile].astype(np.uint8), os.path.join(tmp, f"labels{part}", f"{case_id}.nii.gz"))):
                    itk = sitk.GetImageFromArray(np.ascontiguousarray(array))
                    itk.SetSpacing(spacing)
                    sitk.WriteImage(itk, path)
                case += 1
                training += part == "Tr"
        if case == 0:
            raise ValueError("no (image, labels) pair was given")
        generate_dataset_json(tmp, {0: channel_name}, {n: k for k, n in enumerate(label_names)}, training, ".nii.gz",
                              dataset_name=f"Dataset{int(dataset_id):03d}_{name}", description=description,
                              license="see the source volumes")
        # the datasets replaced are moved aside and deleted only once the new one is in place: an
        # interruption in between puts them back instead of losing both
        aside = []
        try:
            for old in existing:
                aside.append((os.path.join(raw_root, old), os.path.join(raw_root, f".old-{os.getpid()}-{old}")))
                os.replace(*aside[-1])
            os.replace(tmp, folder)
        except BaseException:
            for original, moved in reversed(aside):
                if os.path.lexists(moved):
                    os.replace(moved, original)
            raise
        for _, moved in aside:
            shutil.rmtree(moved, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for made in created:   # innermost first: a failed run leaves no folder it made behind
            with contextlib.suppress(OSError):
                os.rmdir(made)
        raise
    return folder


def _missing_folders(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing
