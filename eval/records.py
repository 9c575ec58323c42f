"""Metric records, bootstrap confidence intervals and the JSON writer shared by every eval module.

A metric record is a dict with `status` "computed" (plus `value` and any extra numbers) or
"not_computed" (plus `reason`). metrics.json never contains NaN or infinity: `write_json` rejects them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np


class TooFewSamplesError(ValueError):
    """A metric was given fewer samples than it needs; the message shows both numbers."""


def computed(value: float, **extra: Any) -> dict[str, Any]:
    """Return a record of a computed metric; `value` must be finite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"metric value is not finite: {value}")
    return {"status": "computed", "value": value, **extra}


def not_computed(reason: str, **extra: Any) -> dict[str, Any]:
    """Return a record of a metric that was skipped, with the reason shown in metrics.json and the report."""
    return {"status": "not_computed", "reason": reason, **extra}


def bootstrap_ci(values: np.ndarray, statistic: Callable[[np.ndarray], float], resamples: int,
                 confidence: float, rng: np.random.Generator) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic` over the first axis of `values`.

    Resamples whose statistic is undefined (non-finite, e.g. an AUC of a resample with one class) are
    dropped. Returns None when fewer than half of the resamples give a finite value.
    """
    n = len(values)
    if n == 0 or resamples <= 0:
        return None
    estimates = []
    for _ in range(resamples):
        index = rng.integers(0, n, size=n)
        estimate = statistic(values[index])
        if math.isfinite(estimate):
            estimates.append(estimate)
    if len(estimates) < resamples / 2:
        return None
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(estimates), [alpha, 1.0 - alpha])
    return float(low), float(high)


def _plain(value: Any) -> Any:
    """Convert numpy scalars and arrays inside nested containers to JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON; raises ValueError when any number is NaN or infinite."""
    text = json.dumps(_plain(data), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n")


def plain(data: Any) -> Any:
    """Return `data` with numpy values converted to Python ones (what metrics.json holds)."""
    return _plain(data)
