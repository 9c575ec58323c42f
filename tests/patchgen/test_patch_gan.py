"""Patch GAN networks and losses, on hand-checkable inputs and on real radiograph patches."""

import math

import pytest
import torch

from patchgen.config import ConfigError, from_dict
from patchgen.patch_gan import (GanConfig, PatchDiscriminator, PatchGanTask, PatchGenerator,
                                discriminator_terms, fill_padding, generator_term, logit_weights,
                                r1_penalty, weighted_mean)
from patchgen.patch_model import PatchConfig
from tests.patchgen.test_patch_data import build_fracatlas_store  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model": "gan", "network": {"channels": [8, 16], "norm_groups": 4},
        "data": {"patch_size": 16},
        "gan": {"noise_channels": 2, "disc_channels": [8, 16], "r1_interval": 1, "l1_weight": 0.1}}


def tiny_config(**gan) -> PatchConfig:
    data = {**TINY, "gan": {**TINY["gan"], **gan}}
    return from_dict(PatchConfig, data)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_fracatlas_store(tmp_path_factory.mktemp("patch-gan") / "store.zarr")


def real_batch(task, seeds=(1, 2, 3)):
    dataset = task.dataset()
    keys = [(index % len(dataset), seed) for index, seed in enumerate(seeds)]
    return torch.utils.data.default_collate(dataset.__getitems__(keys))


@pytest.mark.parametrize("loss", ["hinge", "non-saturating"])
def test_losses_finite_on_real_batch(store, loss):
    torch.manual_seed(0)
    config = tiny_config(loss=loss)
    task = PatchGanTask(store, store.rows(), store.labels(), config)
    batch = real_batch(task)
    d_loss, d_stats = task.loss("discriminator", task.networks, batch)
    g_loss, g_stats = task.loss("generator", task.networks, batch)
    assert math.isfinite(float(d_loss.detach()))
    assert math.isfinite(float(g_loss.detach()))
    assert d_stats["d_r1"] > 0
    assert all(math.isfinite(v) for v in {**d_stats, **g_stats}.values())


def test_discriminator_loss_backpropagates(store):
    torch.manual_seed(0)
    task = PatchGanTask(store, store.rows(), store.labels(), tiny_config())
    loss, _ = task.loss("discriminator", task.networks, real_batch(task))
    loss.backward()
    gradients = [p.grad for p in task.networks["discriminator"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)


def test_hinge_terms_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.5, 1.0])
    real_term, fake_term = discriminator_terms(real, fake, "hinge")
    assert real_term.tolist() == [0.0, 0.5, 2.0]
    assert fake_term.tolist() == [0.0, 1.5, 2.0]
    assert generator_term(fake, "hinge").tolist() == [2.0, -0.5, -1.0]


def test_non_saturating_terms_by_hand():
    real_term, fake_term = discriminator_terms(torch.tensor([0.0]), torch.tensor([0.0]),
                                               "non-saturating")
    assert real_term.item() == pytest.approx(math.log(2))
    assert fake_term.item() == pytest.approx(math.log(2))
    generator_loss = generator_term(torch.tensor([0.0]), "non-saturating")
    assert generator_loss.item() == pytest.approx(math.log(2))


def test_r1_of_linear_critic_is_weight_norm():
    weight = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    real = torch.randn(4, 1, 2, 2, requires_grad=True)
    logits = (real * weight).sum(dim=(1, 2, 3))
    assert r1_penalty(logits, real).item() == pytest.approx(1 + 4 + 0.25 + 9)


def test_weighted_mean_ignores_padding():
    values = torch.tensor([[[[1.0, 5.0]]]])
    weights = torch.tensor([[[[1.0, 0.0]]]])
    assert weighted_mean(values, weights).item() == 1.0


def test_logit_weights_are_valid_share():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :2] = 1
    weights = logit_weights(mask, torch.zeros(1, 1, 2, 2))
    assert weights[0, 0].tolist() == [[0.5, 0.0], [0.5, 0.0]]


def test_fill_padding_sets_minus_one():
    patch = torch.full((1, 1, 2, 2), 0.3)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    filled = fill_padding(patch, mask)
    assert filled[0, 0, 0, 1].item() == -1.0
    assert torch.allclose(filled[0, 0][mask[0, 0] == 1], torch.full((3,), 0.3))


def conditioning(batch=2, size=16):
    cond = torch.linspace(-0.9, 0.9, size * size).reshape(1, 1, size, size).repeat(batch, 1, 1, 1)
    coords = torch.zeros(batch, 2, size, size)
    mask = torch.ones(batch, 1, size, size)
    labels = torch.tensor([0, 1][:batch])
    return cond, coords, mask, labels, torch.zeros(batch, dtype=torch.long)


def test_residual_generator_starts_from_cond():
    torch.manual_seed(0)
    generator = PatchGenerator(patch_size=16, noise_channels=2, channels=(8, 16), norm_groups=4)
    cond, *rest = conditioning()
    output = generator(torch.randn(2, 2, 16, 16), cond, *rest)
    assert torch.allclose(output, cond, atol=1e-5)


def test_generator_output_in_range_for_any_size():
    torch.manual_seed(0)
    generator = PatchGenerator(patch_size=16, noise_channels=2, channels=(8, 16), norm_groups=4,
                               residual=False)
    for size in (16, 32):
        cond, *rest = conditioning(size=size)
        output = generator(torch.randn(2, 2, size, size) * 10, cond, *rest)
        assert output.shape == (2, 1, size, size)
        assert output.abs().max() <= 1


def test_generator_rejects_wrong_noise_channels():
    generator = PatchGenerator(patch_size=16, noise_channels=2, channels=(8, 16), norm_groups=4)
    cond, *rest = conditioning()
    with pytest.raises(ValueError, match="takes 2"):
        generator(torch.randn(2, 3, 16, 16), cond, *rest)


@pytest.mark.parametrize("size", [16, 32])
def test_discriminator_logit_map_shape(size):
    discriminator = PatchDiscriminator((8, 16), num_labels=2)
    cond, coords, mask, labels, level = conditioning(size=size)
    logits = discriminator(cond, cond, coords, mask, labels, level)
    assert logits.shape == (2, 1, size // 4, size // 4)


def test_discriminator_projection_uses_label():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator((8, 16), num_labels=2)
    torch.nn.init.normal_(discriminator.label_embedding.weight)
    cond, coords, mask, _, level = conditioning(batch=2)
    same = torch.tensor([0, 0])
    other = torch.tensor([0, 1])
    first = discriminator(cond, cond, coords, mask, same, level)
    second = discriminator(cond, cond, coords, mask, other, level)
    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[1], second[1])


def test_lazy_r1_share(store):
    task = PatchGanTask(store, store.rows(), store.labels(), tiny_config(r1_interval=4))
    applied = [task._apply_r1(torch.tensor([seed])) for seed in range(4000)]
    assert abs(sum(applied) / len(applied) - 0.25) < 0.03


@pytest.mark.parametrize("gan, message", [
    ({"loss": "wasserstein"}, "gan.loss"),
    ({"r1_interval": 0}, "gan.r1_interval"),
    ({"noise_channels": 0}, "gan.noise_channels"),
    ({"disc_chanels": [8]}, "gan.disc_chanels"),
])
def test_config_rejects_invalid(gan, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**gan)


def test_config_fills_gan_defaults():
    config = tiny_config()
    defaults = from_dict(GanConfig, {})
    assert config.gan["spectral_norm"] == defaults.spectral_norm
    assert config.gan["noise_channels"] == 2


def test_task_rejects_patch_not_divisible_by_discriminator(store):
    config = tiny_config(disc_channels=[8, 16, 16, 16, 16])
    with pytest.raises(ConfigError, match="divisible by 32"):
        PatchGanTask(store, store.rows(), store.labels(), config)


@pytest.mark.parametrize("name", ["gan-cpu-tiny", "gan-gpu"])
def test_gan_presets_parse(name):
    from patchgen.config import load_stage_config

    config, _ = load_stage_config(PatchConfig, "patch", name)
    assert config.model == "gan"
    assert config.data.patch_size % from_dict(GanConfig, config.gan).downsampling() == 0
    assert set(config.train.lr_scale) == {"generator", "discriminator"}
