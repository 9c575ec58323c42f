"""Synthesis through a real, untrained patch UNet saved and loaded with patchgen's API."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchgen.config import from_dict
from patchgen.inference import load_patch
from patchgen.patch_model import PatchConfig, build_patch_unet, write_patch_info
from stitching.config import SynthConfig
from stitching.synthesize import synthesize_with
from tests.stitching.tiny_models import CPU, StubGlobalSampler

LABELS = ["fractured", "non_fractured"]


@pytest.fixture
def patch_run(tmp_path):
    config = from_dict(PatchConfig, {"network": {"channels": [8, 16], "norm_groups": 4},
                                     "data": {"patch_size": 16},
                                     "diffusion": {"sampling_steps": 2}})
    torch.manual_seed(0)  # weight initialisation of the untrained network
    network = build_patch_unet(config, num_labels=len(LABELS))
    model_dir = tmp_path / "patch" / "model"
    network.save_pretrained(model_dir / "unet")
    write_patch_info(model_dir, "diffusion", LABELS, config)
    return tmp_path / "patch"


def run(tmp_path, patch_run, name, tile_batch):
    global_path = tmp_path / "global.safetensors"
    global_path.write_bytes(b"global")
    config = from_dict(SynthConfig, {"n": 1, "seed": 2, "size": "48x40",
                                     "canvas": {"overlap": 4, "tile_batch": tile_batch}})
    summary = synthesize_with(StubGlobalSampler(global_path), load_patch(patch_run, CPU),
                              tmp_path / name, config, CPU, progress=False)
    return summary, tmp_path / name


def test_real_patch_unet_writes_image(tmp_path, patch_run):
    summary, out_dir = run(tmp_path, patch_run, "out", tile_batch=4)
    assert summary.written == ["fractured_00000"]
    record = json.loads((out_dir / "fractured_00000.json").read_text())
    assert record["tile_grid"]["tile_size"] == 16
    assert record["checkpoints"]["patch"]["path"] == str(patch_run / "model")
    with Image.open(out_dir / "fractured_00000.png") as image:
        assert image.size == (40, 48)


def test_real_patch_unet_tile_batch_invariant(tmp_path, patch_run):
    _, first = run(tmp_path, patch_run, "a", tile_batch=2)
    _, second = run(tmp_path, patch_run, "b", tile_batch=6)
    with Image.open(first / "fractured_00000.png") as a, Image.open(second / "fractured_00000.png") as b:
        difference = np.asarray(a).astype(int) - np.asarray(b).astype(int)
    # Convolutions may round differently for different batch sizes, so allow one 16-bit step.
    assert np.abs(difference).max() <= 1


def test_tile_size_not_divisible_rejected(tmp_path, patch_run):
    config = from_dict(SynthConfig, {"n": 1, "size": "48x40",
                                     "canvas": {"tile_size": 15, "overlap": 4}})
    global_path = tmp_path / "global.safetensors"
    global_path.write_bytes(b"global")
    with pytest.raises(ValueError, match="canvas.tile_size=15 must be divisible by 2"):
        synthesize_with(StubGlobalSampler(global_path), load_patch(patch_run, CPU),
                        tmp_path / "out", config, CPU, progress=False)
