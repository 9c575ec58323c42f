"""LPIPS with a local backbone file and MS-SSIM between pairs."""

import numpy as np
import pytest
from safetensors.torch import save_file

from eval.diversity import LocalLPIPS, lpips_pairs, ms_ssim_pairs, pair_indices
from eval.weights import WeightsError, sha256_file


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, alexnet_features):
    """Random AlexNet features saved as the cache file would contain them."""
    path = tmp_path_factory.mktemp("weights") / "lpips-alex.safetensors"
    save_file(alexnet_features, str(path))
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)


def test_lpips_identical_is_zero(backbone, images):
    model = LocalLPIPS("alex", backbone, sha256_file(backbone))
    values = lpips_pairs(model, np.stack([images[0], images[0]]), np.array([[0, 1]]))
    assert values[0] == pytest.approx(0.0, abs=1e-7)


def test_lpips_different_is_positive(backbone, images):
    model = LocalLPIPS("alex", backbone, sha256_file(backbone))
    values = lpips_pairs(model, images, np.array([[0, 1], [1, 2]]))
    assert (values > 0).all()


def test_lpips_wrong_hash(backbone):
    with pytest.raises(WeightsError, match="SHA-256"):
        LocalLPIPS("alex", backbone, "f" * 64)


def test_ms_ssim_identical_is_one():
    image = np.random.default_rng(1).random((1, 176, 176)).astype(np.float32)
    values = ms_ssim_pairs(np.concatenate([image, image]), np.array([[0, 1]]))
    assert values[0] == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_small_view_rejected():
    with pytest.raises(ValueError, match="at least 161"):
        ms_ssim_pairs(np.zeros((2, 64, 64), np.float32), np.array([[0, 1]]))


def test_pairs_distinct():
    pairs = pair_indices(5, 4, np.random.default_rng(0))
    assert pairs.shape == (4, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == 4


def test_pairs_single_image_empty():
    assert pair_indices(1, 4, np.random.default_rng(0)).shape == (0, 2)
