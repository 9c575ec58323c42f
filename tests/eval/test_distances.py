"""FID, KID and precision/recall/density/coverage on feature tables small enough to check by hand."""

import numpy as np
import pytest

from eval.distances import (equalize_counts, frechet_distance, frechet_interval, kernel_distance,
                            precision_recall_density_coverage, standardize)
from eval.records import TooFewSamplesError


@pytest.fixture()
def features():
    rng = np.random.default_rng(0)
    return rng.normal(size=(120, 8)), rng.normal(size=(120, 8)) + 1.0


def test_fid_self_is_zero(features):
    real, _ = features
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)


def test_fid_shifted_mean(features):
    real, _ = features
    # Equal covariances: FID is the squared mean shift, 8 dimensions x 2^2.
    assert frechet_distance(real, real + 2.0) == pytest.approx(32.0, rel=1e-6)


def test_fid_too_few_shows_counts(features):
    real, fake = features
    with pytest.raises(TooFewSamplesError, match=r"at least 9 synthetic.*got 5"):
        frechet_distance(real, fake[:5])


def test_fid_allow_small_is_finite(features):
    real, fake = features
    value = frechet_distance(real, fake[:3], allow_small=True)
    assert np.isfinite(value)
    assert value >= 0.0


def test_fid_below_two_always_fails(features):
    real, fake = features
    with pytest.raises(TooFewSamplesError, match="got 1"):
        frechet_distance(real, fake[:1], allow_small=True)


def test_kid_subset_too_large(features):
    real, fake = features
    with pytest.raises(TooFewSamplesError, match=r"subset size 50 is larger than the synthetic set \(20"):
        kernel_distance(real, fake[:20], subset_size=50, subsets=5, seed=0)


def test_kid_separates_sets(features):
    real, fake = features
    same, _ = kernel_distance(real[:60], real[60:], subset_size=40, subsets=20, seed=0)
    shifted, _ = kernel_distance(real, fake, subset_size=40, subsets=20, seed=0)
    assert abs(same) < 0.1
    assert shifted > 0.5


def test_kid_seeded(features):
    real, fake = features
    first = kernel_distance(real, fake, subset_size=30, subsets=5, seed=3)
    second = kernel_distance(real, fake, subset_size=30, subsets=5, seed=3)
    assert first == second


def test_prdc_identical_sets(features):
    real, _ = features
    result = precision_recall_density_coverage(real, real.copy(), k=5)
    assert result["precision"] == 1.0
    assert result["recall"] == 1.0
    assert result["coverage"] == 1.0


def test_prdc_far_sets(features):
    real, _ = features
    result = precision_recall_density_coverage(real, real + 100.0, k=5)
    assert result["precision"] == 0.0
    assert result["recall"] == 0.0
    assert result["density"] == 0.0
    assert result["coverage"] == 0.0


def test_prdc_too_few(features):
    real, fake = features
    with pytest.raises(TooFewSamplesError, match="needs at least 6 .* got 3"):
        precision_recall_density_coverage(real[:3], fake[:3], k=5)


def test_equalize_counts(features):
    real, fake = features
    small_real, small_fake = equalize_counts(real, fake[:7], np.random.default_rng(0))
    assert len(small_real) == 7
    assert len(small_fake) == 7


def test_standardize_uses_real_stats(features):
    real, fake = features
    z_real, z_fake = standardize(real, fake)
    assert np.allclose(z_real.mean(axis=0), 0.0)
    assert np.allclose(z_real.std(axis=0), 1.0)
    assert z_fake.mean() > 0.5


def test_fid_matches_torchmetrics(features):
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from eval.features import PrecomputedFeatures

    real, fake = features
    fake = fake * np.linspace(0.5, 2.0, 8)  # different covariances, so the trace term matters
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(8), normalize=False)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(metric.compute()), rel=1e-9)


def test_fid_low_rank_matches_full(features):
    real, fake = features
    # 20 samples in 8 dimensions uses the D-space QR path; 6 in 8 the sample-space path.
    wide_real, wide_fake = np.concatenate([real[:6], real[:6] * 0]), fake[:6]
    assert frechet_distance(real[:20], fake[:20]) > 0.0
    assert np.isfinite(frechet_distance(wide_real[:6], wide_fake, allow_small=True))


def test_fid_interval_brackets_shift(features):
    real, _ = features
    interval = frechet_interval(real, real + 2.0, 20, np.random.default_rng(0))
    assert 25.0 < interval[0] < 32.0  # the FID of this shift is 32 (see test_fid_shifted_mean)
    assert 32.0 < interval[1] < 40.0


def test_fid_interval_disabled(features):
    real, fake = features
    assert frechet_interval(real, fake, 0, np.random.default_rng(0)) is None
