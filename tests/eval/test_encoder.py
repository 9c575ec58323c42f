"""Contrastive encoder pieces: augmentation and the NT-Xent loss."""

import torch

from eval.encoder import Encoder, EncoderFeatures, augment, nt_xent


def test_augment_seeded_and_in_range():
    batch = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    first = augment(batch, torch.Generator().manual_seed(0))
    second = augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(first, second)
    assert first.shape == batch.shape
    assert first.min() >= 0.0
    assert first.max() <= 1.0


def test_nt_xent_prefers_partners():
    embeddings = torch.eye(8)[:4] * 5.0
    matched = nt_xent(embeddings, embeddings.clone(), temperature=0.2)
    shuffled = nt_xent(embeddings, embeddings[[1, 2, 3, 0]], temperature=0.2)
    assert matched < shuffled


def test_features_any_input_size():
    extractor = EncoderFeatures(Encoder(width=8, embedding_dim=16), image_size=32)
    features = extractor(torch.rand(3, 1, 50, 70))
    assert features.shape == (3, 16)
    assert extractor.num_features == 16
