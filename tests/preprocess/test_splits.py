"""Patient-level, label-stratified, seeded splits."""

from __future__ import annotations

import pytest

from preprocess.splits import SplitFractions, assign_splits, split_counts


def patients(count, label, prefix):
    """Return {patient: [label]} for ``count`` patients."""
    return {f"{prefix}{index}": [label] for index in range(count)}


def test_every_label_with_three_gets_test():
    labels = {**patients(3, "fractured", "f"), **patients(4, "normal", "n"),
              **patients(2, "rare", "r")}
    splits = assign_splits(labels, SplitFractions(), seed=0)
    for prefix in ("f", "n"):
        assigned = [split for patient, split in splits.items() if patient.startswith(prefix)]
        assert "test" in assigned
        assert "val" in assigned
        assert "train" in assigned
    assert [splits["r0"], splits["r1"]] == ["train", "train"]


def test_fractions_respected():
    splits = assign_splits(patients(100, "a", "p"), SplitFractions(0.8, 0.1, 0.1), seed=1)
    assert sorted(splits.values()).count("test") == 10
    assert sorted(splits.values()).count("val") == 10


def test_seed_changes_assignment():
    labels = patients(50, "a", "p")
    first = assign_splits(labels, SplitFractions(), seed=0)
    assert first == assign_splits(labels, SplitFractions(), seed=0)
    assert first != assign_splits(labels, SplitFractions(), seed=1)


def test_mixed_label_patient_grouped():
    labels = {"p0": ["a", "b"], "p1": ["a"], "p2": ["b"]}
    assert set(assign_splits(labels, SplitFractions(), seed=0)) == {"p0", "p1", "p2"}


def test_counts_keep_one_train():
    assert split_counts(3, SplitFractions()) == (1, 1)
    assert split_counts(2, SplitFractions()) == (0, 0)
    assert split_counts(1, SplitFractions(0.0, 0.0, 1.0)) == (1, 0)


def test_parse_rejects_bad_text():
    assert SplitFractions.parse("0.7,0.2,0.1") == SplitFractions(0.7, 0.2, 0.1)
    with pytest.raises(ValueError, match="--split"):
        SplitFractions.parse("0.8,0.2")
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions.parse("0.8,0.2,0.2")
