"""OME-NGFF 0.5 ``multiscales`` metadata of one radiograph (Zarr v3 group attribute ``ome``).

Level k has scale 2^k x spacing and translation (2^k - 1) / 2 x spacing per axis, so the centre
of its pixel i lies at the centre of level-0 pixels 2^k i ... 2^k (i + 1) - 1 and all levels align
in physical space. With unknown spacing the unit is the level-0 pixel and no axis unit is given.
"""

from __future__ import annotations

import math
from typing import Any

NGFF_VERSION = "0.5"
AXIS_NAMES = ("y", "x")
DOWNSAMPLING_TYPE = "antialiased bilinear (tent), factor 2"


def level_transforms(level: int, spacing_mm: tuple[float, float] | None) -> list[dict[str, Any]]:
    """Return the coordinateTransformations (scale, translation) of one level."""
    unit = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    factor = 2.0 ** level
    return [
        {"type": "scale", "scale": [factor * unit[0], factor * unit[1]]},
        {"type": "translation", "translation": [(factor - 1) / 2 * unit[0],
                                                (factor - 1) / 2 * unit[1]]},
    ]


def multiscales_attributes(name: str, levels: int,
                           spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """Return the ``ome`` group attribute for an image with ``levels`` arrays named "0".."L-1".

    Args:
        name: the image id.
        levels: number of pyramid levels.
        spacing_mm: (row, column) spacing of level 0 in mm, or None when unknown.
    """
    axes: list[dict[str, str]] = [{"name": axis, "type": "space"} for axis in AXIS_NAMES]
    if spacing_mm is not None:
        for axis in axes:
            axis["unit"] = "millimeter"
    datasets = [{"path": str(level), "coordinateTransformations": level_transforms(level,
                                                                                   spacing_mm)}
                for level in range(levels)]
    multiscale = {"name": name, "axes": axes, "datasets": datasets, "type": DOWNSAMPLING_TYPE,
                  "metadata": {"method": "torch.nn.functional.interpolate",
                               "kwargs": {"mode": "bilinear", "antialias": True,
                                          "align_corners": False},
                               "odd_sizes": "last row/column repeated before halving"}}
    return {"version": NGFF_VERSION, "multiscales": [multiscale]}


def check_multiscales(ome: Any, levels: int, spacing_mm: tuple[float, float] | None) -> list[str]:
    """Return the problems of an ``ome`` attribute against the expected levels and spacing."""
    if not isinstance(ome, dict) or ome.get("version") != NGFF_VERSION:
        return [f"ome.version is not {NGFF_VERSION}"]
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or len(multiscales) != 1:
        return ["ome.multiscales must hold exactly one multiscale"]
    multiscale = multiscales[0]
    problems = []
    if [axis.get("name") for axis in multiscale.get("axes", [])] != list(AXIS_NAMES):
        problems.append("axes are not y, x")
    datasets = multiscale.get("datasets", [])
    if [dataset.get("path") for dataset in datasets] != [str(level) for level in range(levels)]:
        problems.append(f"dataset paths are not 0..{levels - 1}")
        return problems
    for level, dataset in enumerate(datasets):
        if not _transforms_match(dataset.get("coordinateTransformations"),
                                 level_transforms(level, spacing_mm)):
            problems.append(f"level {level} scale/translation do not match the spacing")
    return problems


def _transforms_match(found: Any, expected: list[dict[str, Any]]) -> bool:
    """Return True when two transformation lists agree to 1e-9 relative."""
    if not isinstance(found, list) or len(found) != len(expected):
        return False
    for found_item, expected_item in zip(found, expected):
        kind = expected_item["type"]
        if not isinstance(found_item, dict) or found_item.get("type") != kind:
            return False
        values = found_item.get(kind)
        if not isinstance(values, list) or len(values) != 2:
            return False
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                   for a, b in zip(values, expected_item[kind])):
            return False
    return True
