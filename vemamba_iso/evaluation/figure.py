"""Orthogonal views (XY, XZ, YZ through the centre) of several volumes side by side."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def orthogonal_views(volumes: dict[str, np.ndarray], path: str | os.PathLike, title: str = "",
                     crop: int | None = 128, z_index: int | None = None) -> Path:
    """Write a PNG: one column per named (Z, Y, X) volume, rows = XY, XZ, YZ planes through the centre.

    ``crop`` limits each view to its central ``crop`` x ``crop`` pixels so that detail stays visible;
    ``z_index`` picks the XY plane (e.g. a slice the degradation removed), default the central one.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def centre(a):
        if crop is None:
            return a
        slices = tuple(slice(max(0, (s - crop) // 2), max(0, (s - crop) // 2) + crop) for s in a.shape)
        return a[slices]

    names = list(volumes)
    first = volumes[names[0]]
    lo, hi = np.percentile(first, [0.5, 99.5])
    fig, axes = plt.subplots(3, len(names), figsize=(2.6 * len(names), 7.8), squeeze=False)
    for col, name in enumerate(names):
        v = volumes[name]
        z, y, x = (s // 2 for s in v.shape)
        z = z if z_index is None else z_index
        for row, (plane, image) in enumerate(((f"XY (z={z})", v[z]), (f"XZ (y={y})", v[:, y]),
                                              (f"YZ (x={x})", v[:, :, x]))):
            ax = axes[row, col]
            ax.imshow(centre(image), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(plane)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
