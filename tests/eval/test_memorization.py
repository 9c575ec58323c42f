"""Nearest-neighbour similarities and the calibrated memorization threshold on arrays."""

import numpy as np
import pytest

from eval.memorization import memorization_table, nearest_neighbours, normalise_rows, unit_rows
from eval.records import TooFewSamplesError


def _smooth_images(rng, count, size=32):
    noise = rng.normal(size=(count, size, size))
    return np.cumsum(np.cumsum(noise, axis=1), axis=2).reshape(count, -1)


def test_ncc_of_copy_is_one():
    rng = np.random.default_rng(0)
    train = normalise_rows(_smooth_images(rng, 10))
    similarity, index = nearest_neighbours(train[[3]], train)
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert index[0] == 3


def test_ncc_ignores_brightness_and_contrast():
    rng = np.random.default_rng(1)
    images = _smooth_images(rng, 4)
    changed = normalise_rows(images[[2]] * 0.5 + 7.0)
    similarity, index = nearest_neighbours(changed, normalise_rows(images))
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert index[0] == 2


def test_batches_match_single_pass():
    rng = np.random.default_rng(2)
    queries, references = unit_rows(rng.normal(size=(37, 8))), unit_rows(rng.normal(size=(11, 8)))
    small = nearest_neighbours(queries, references, batch_size=4)
    large = nearest_neighbours(queries, references, batch_size=1000)
    assert np.allclose(small[0], large[0])
    assert np.array_equal(small[1], large[1])


def test_planted_copy_flagged():
    rng = np.random.default_rng(3)
    train = normalise_rows(_smooth_images(rng, 40))
    test = normalise_rows(_smooth_images(rng, 20))
    synthetic = normalise_rows(np.concatenate([_smooth_images(rng, 5), _smooth_images(rng, 40)[:0]]))
    synthetic = np.concatenate([synthetic, train[[7]]])
    labels = ["a", "a", "b", "b", "b", "b"]
    table = memorization_table("ncc", synthetic, train, test, labels, 0.99, np.random.default_rng(0))
    assert table["above"] == [False, False, False, False, False, True]
    assert table["nearest_index"][-1] == 7
    assert table["share_above"]["value"] == pytest.approx(1 / 6)
    assert table["per_label"]["a"]["value"] == 0.0
    assert table["per_label"]["b"]["count"] == 1


def test_no_test_split_reports_reason():
    rng = np.random.default_rng(4)
    train = normalise_rows(_smooth_images(rng, 5))
    table = memorization_table("ncc", train[:2], train, train[:0], ["a", "b"], 0.99, np.random.default_rng(0))
    assert table["threshold"]["status"] == "not_computed"
    assert "got 0" in table["threshold"]["reason"]


def test_empty_reference_fails():
    with pytest.raises(TooFewSamplesError):
        nearest_neighbours(np.zeros((1, 4), np.float32), np.zeros((0, 4), np.float32))
