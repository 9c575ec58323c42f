"""Patient-level train/val/test splits, stratified by label, seeded.

All images of one patient share a split. Patients are grouped by their label, and a patient with
images of several labels forms the group "a+b". Each group is shuffled with its own generator,
seeded from (seed, group name), and cut into test, val and train by the fractions, rounding half
up. A group of 3 or more patients gets at least one test and one val patient (when those fractions
are above 0) and keeps at least one train patient.

NOTE: adding patients to a store and rebuilding can move existing patients to another split,
because the cut points depend on the group sizes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")
MIN_GROUP_FOR_EVERY_SPLIT = 3


@dataclass(frozen=True)
class SplitFractions:
    """Shares of patients per split; each in [0, 1], summing to 1."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if any(value < 0 or value > 1 for value in values) or not math.isclose(sum(values), 1.0,
                                                                               abs_tol=1e-6):
            raise ValueError(f"split fractions {values} are invalid; give three shares in [0, 1] "
                             "for train, val and test that sum to 1, e.g. 0.8,0.1,0.1")

    @classmethod
    def parse(cls, text: str) -> "SplitFractions":
        """Parse "train,val,test" such as "0.8,0.1,0.1"."""
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 3:
            raise ValueError(f"--split {text!r} is invalid; give three comma-separated shares "
                             "for train, val and test, e.g. 0.8,0.1,0.1")
        return cls(*values)


def assign_splits(patient_labels: Mapping[str, Sequence[str]], fractions: SplitFractions,
                  seed: int) -> dict[str, str]:
    """Assign every patient to train, val or test.

    Args:
        patient_labels: patient id -> labels of that patient's images.
        fractions: shares of patients per split within each label group.
        seed: split seed; the same inputs and seed give the same splits.
    Returns:
        patient id -> "train" | "val" | "test".
    """
    groups: dict[str, list[str]] = {}
    for patient, labels in patient_labels.items():
        groups.setdefault("+".join(sorted(set(labels))), []).append(patient)

    splits: dict[str, str] = {}
    for group, patients in sorted(groups.items()):
        rng = np.random.default_rng([seed, _stable_number(group)])
        order = [sorted(patients)[index] for index in rng.permutation(len(patients))]
        test_count, val_count = split_counts(len(order), fractions)
        for position, patient in enumerate(order):
            if position < test_count:
                splits[patient] = "test"
            elif position < test_count + val_count:
                splits[patient] = "val"
            else:
                splits[patient] = "train"
    return splits


def split_counts(count: int, fractions: SplitFractions) -> tuple[int, int]:
    """Return (test, val) patient counts for a group of ``count`` patients."""
    test = math.floor(count * fractions.test + 0.5)
    val = math.floor(count * fractions.val + 0.5)
    if count >= MIN_GROUP_FOR_EVERY_SPLIT:
        test = max(test, 1 if fractions.test > 0 else 0)
        val = max(val, 1 if fractions.val > 0 else 0)
    keep_train = 1 if fractions.train > 0 and count > 0 else 0
    while test + val > count - keep_train and (test or val):
        if val >= test and val:
            val -= 1
        else:
            test -= 1
    return test, val


def _stable_number(text: str) -> int:
    """Return a 64-bit number from text that is the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
