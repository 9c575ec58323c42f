"""Classifier path on a tiny separable toy set, and the test metrics on hand-checked numbers."""

import numpy as np
import pytest
import torch

from eval.classify import build_classifier, label_fidelity, metrics_with_ci, predict_proba, roc_auc, \
    classification_metrics, train_classifier
from eval.config import ClassifyConfig


def _toy(count, seed):
    """Class 1 has a bright horizontal band, class 0 has none."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(count) % 2
    images = torch.rand(count, 1, 32, 32, generator=generator) * 0.3
    images[targets == 1, :, 12:20, :] += 0.6
    return images, targets


def test_separable_toy_high_auc():
    images, targets = _toy(48, 0)
    config = ClassifyConfig(arch="resnet10", image_size=32, epochs=3, batch_size=16)
    model = train_classifier(images, targets, 2, config, seed=0)
    test_images, test_targets = _toy(40, 1)
    result = metrics_with_ci(predict_proba(model, test_images), test_targets.numpy(), 1, 200, 0.95,
                             np.random.default_rng(0))
    assert result["auc"]["value"] > 0.95
    assert result["accuracy"]["value"] > 0.8
    assert result["auc"]["ci"][0] <= result["auc"]["value"] <= result["auc"]["ci"][1]


def test_auc_by_hand():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    positive = np.array([False, False, True, True])
    assert roc_auc(scores, positive) == pytest.approx(0.75)


def test_auc_one_class_is_nan():
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_metrics_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 1, 0])
    metrics = classification_metrics(probabilities, truth, positive=1)
    assert metrics["accuracy"] == 0.5
    assert metrics["sensitivity"] == 0.5
    assert metrics["specificity"] == 0.5


def test_missing_class_not_computed():
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3]])
    result = metrics_with_ci(probabilities, np.array([0, 0]), 1, 50, 0.95, np.random.default_rng(0))
    assert result["auc"]["status"] == "not_computed"
    assert result["accuracy"]["value"] == 1.0


def test_label_fidelity_per_label():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    result = label_fidelity(probabilities, np.array([0, 1, 1]), ["neg", "pos"], 100, 0.95,
                            np.random.default_rng(0))
    assert result["overall"]["value"] == pytest.approx(2 / 3)
    assert result["neg"]["value"] == 1.0
    assert result["pos"]["value"] == 0.5


def test_pretrained_partial_load(tmp_path):
    from safetensors.torch import save_file

    source = build_classifier("resnet10", 3)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_classifier("resnet10", 2, path)  # head differs (3 vs 2 classes), the rest loads
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (2, 512)


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        build_classifier("resnet10", 2, tmp_path / "none.safetensors")
