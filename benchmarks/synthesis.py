"""Benchmark tiled native-size synthesis: overhead over the model, host memory, wall time.

For each output size (in megapixels) a fresh process

1. saves an untrained patch UNet built from a patch preset and loads it with
   ``patchgen.inference.load_patch``, so the callable is the one ``synthesize`` uses;
2. times one model call on a full tile batch (median of ``--repeats``);
3. samples every patch level of one image with ``stitching.synthesize.sample_native`` from an
   analytic layout (the global model is not part of this benchmark), counting tile evaluations,
   and converts it to 16-bit pixels;
4. reports overhead = synthesis time / (tile evaluations x model time per tile), where the
   model time per tile is the mean time of the full-batch model calls made during the
   synthesis divided by the tile batch (the mean follows any change of machine load during the
   run; the median and the isolated timing of step 2 are reported too), the
   peak host RSS above the RSS of the loaded model and above the peak of the model calls of
   step 2, and on CUDA the peak device memory.

The overhead is computed from wall time and, as ``overhead_cpu``, from the CPU time of this
process, which other processes on a shared machine disturb much less.

Example (the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/synthesis.py --megapixels 1 4 15 --out /tmp/synthesis.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchgen.config import from_dict, load_stage_config, load_yaml, preset_path  # noqa: E402
from patchgen.global_model import layout_level  # noqa: E402
from patchgen.inference import load_patch  # noqa: E402
from patchgen.patch_model import PatchConfig, build_patch_unet, write_patch_info  # noqa: E402
from stitching.config import SynthConfig  # noqa: E402
from stitching.storage import CanvasStore  # noqa: E402
from stitching.synthesize import ImagePlan, sample_native, tiling_for, to_uint16  # noqa: E402

LABELS = ["fractured", "non_fractured"]
PAGE_BYTES = resource.getpagesize()


class AnalyticLayout:
    """Global sampler stand-in: a smooth bone-like ramp at the layout level, no model."""

    def __init__(self, resolution: int):
        self.labels = LABELS
        self.resolution = resolution

    def layout_level(self, native_size: tuple[int, int]) -> int:
        return layout_level(native_size, self.resolution)

    def sample_layout(self, label, native_size, generator, steps=None, guidance_scale=None):
        from patchgen.conditioning import level_shape

        height, width = level_shape(native_size, self.layout_level(native_size))
        rows = np.linspace(-1, 1, height)[:, None]
        cols = np.linspace(-1, 1, width)[None, :]
        shaft = np.exp(-(cols - 0.2 * rows) ** 2 / 0.05)
        return (0.2 + 0.6 * shaft).astype(np.float32)

    def spacing_mm(self, label):
        return None


class CountingModel:
    """Wrap a denoise function; count calls and tile evaluations and time full-batch calls."""

    def __init__(self, denoise_fn, tile_batch: int, device: torch.device):
        self.denoise_fn = denoise_fn
        self.tile_batch = tile_batch
        self.device = device
        self.calls = 0
        self.tiles = 0
        self.seconds = 0.0
        self.full_batch_seconds: list[float] = []
        self.full_batch_cpu_seconds: list[float] = []

    def __call__(self, x_t, *args):
        synchronize(self.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        output = self.denoise_fn(x_t, *args)
        synchronize(self.device)
        elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
        self.calls += 1
        self.tiles += x_t.shape[0]
        self.seconds += elapsed
        if x_t.shape[0] == self.tile_batch:
            self.full_batch_seconds.append(elapsed)
            self.full_batch_cpu_seconds.append(cpu_elapsed)
        return output


class PeakRss:
    """Poll /proc/self/statm in a thread and keep the largest resident set size in bytes."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def current_rss() -> int:
    """Return the resident set size of this process in bytes."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES


def save_patch_run(folder: Path, patch_preset: str) -> Path:
    """Save an untrained patch UNet of a patch preset as a run folder and return it."""
    config = from_dict(PatchConfig, load_yaml(preset_path("patch", patch_preset)))
    torch.manual_seed(0)  # weight initialisation; speed does not depend on the weights
    network = build_patch_unet(config, num_labels=len(LABELS))
    model_dir = folder / "patch" / "model"
    network.save_pretrained(model_dir / "unet")
    write_patch_info(model_dir, "diffusion", LABELS, config)
    return folder / "patch"


def time_model_call(patch_sampler, tiling, device: torch.device, repeats: int) -> float:
    """Return the median seconds of one ``denoise_fn`` call on a full tile batch."""
    size, batch = tiling.tile_size, tiling.tile_batch
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, channels, size, size, generator=generator) for channels in (1, 1, 2)]
    mask = torch.ones(batch, 1, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        output = patch_sampler.denoise_fn(inputs[0].to(device), inputs[1].to(device),
                                          inputs[2].to(device), mask.to(device), 500,
                                          labels.to(device), labels.to(device))
        output.cpu()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first call warms up


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_size(megapixels: float) -> tuple[int, int]:
    """Return an (H, W) of about ``megapixels`` with width / height = 4 / 5 (a 35 x 43 cm detector is 0.81)."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 5))
    return round(megapixels * 1e6 / width), width


def run_one(args) -> dict:
    """Measure one output size in this process."""
    device = torch.device(args.device)
    overrides = [f"canvas.tile_batch={args.tile_batch}"] if args.tile_batch else []
    overrides += [f"patch.steps={args.steps}"] if args.steps else []
    overrides += [f"canvas.disk_megapixels={args.disk_megapixels}"] if args.disk_megapixels else []
    config, _ = load_stage_config(SynthConfig, "synth", args.synth_preset, overrides)

    with tempfile.TemporaryDirectory() as folder:
        patch_sampler = load_patch(save_patch_run(Path(folder), args.patch_preset), device)
        tiling = tiling_for(config, patch_sampler)
        model_rss = current_rss()
        with PeakRss() as model_peak:
            model_seconds = time_model_call(patch_sampler, tiling, device, args.repeats)
        counter = CountingModel(patch_sampler.denoise_fn, tiling.tile_batch, device)
        patch_sampler.denoise_fn = counter

        size = native_size(args.megapixels[0])
        plan = ImagePlan(0, LABELS[0], size)
        store = CanvasStore(Path(folder) / "work", config.canvas.disk_megapixels * 1e6,
                            config.canvas.band_rows)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRss() as peak:
            started, cpu_started = time.perf_counter(), time.process_time()
            canvas, facts = sample_native(AnalyticLayout(args.layout_resolution), patch_sampler,
                                          plan, config, store, device)
            pixels = to_uint16(canvas, size, config.canvas.band_rows)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    in_run_call = statistics.mean(counter.full_batch_seconds)
    in_run_cpu_call = statistics.mean(counter.full_batch_cpu_seconds)
    median_call = statistics.median(counter.full_batch_seconds)
    result = {
        "megapixels": size[0] * size[1] / 1e6, "height": size[0], "width": size[1],
        "levels": facts["tile_grid"]["patch_levels"], "steps": config.patch.steps,
        "strength": config.patch.strength,
        "tile_size": tiling.tile_size, "overlap": tiling.overlap, "tile_batch": tiling.tile_batch,
        "disk_canvas": store.uses_disk(size), "model_calls": counter.calls,
        "tile_evaluations": counter.tiles, "synthesis_s": seconds,
        "model_call_s": in_run_call, "isolated_model_call_s": model_seconds,
        "overhead": seconds / (counter.tiles * in_run_call / tiling.tile_batch),
        "overhead_median_timing": seconds / (counter.tiles * median_call / tiling.tile_batch),
        "overhead_isolated_timing": seconds / (counter.tiles * model_seconds / tiling.tile_batch),
        "synthesis_cpu_s": cpu_seconds, "model_call_cpu_s": in_run_cpu_call,
        "overhead_cpu": cpu_seconds / (counter.tiles * in_run_cpu_call / tiling.tile_batch),
        "share_in_model_calls": counter.seconds / seconds,
        "model_rss_mb": model_rss / 2 ** 20,
        "model_call_peak_rss_mb": model_peak.peak / 2 ** 20,
        "peak_rss_mb": peak.peak / 2 ** 20,
        "peak_rss_above_model_mb": (peak.peak - model_rss) / 2 ** 20,
        "peak_rss_above_model_calls_mb": (peak.peak - model_peak.peak) / 2 ** 20,
        "pixels_mean": float(pixels.mean()),
        "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    if device.type == "cuda":
        result["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1, 4, 15],
                        help="output sizes in megapixels, each measured in a fresh process")
    parser.add_argument("--synth-preset", default="cpu-tiny", help="configs/synth preset")
    parser.add_argument("--patch-preset", default="cpu-tiny", help="configs/patch preset")
    parser.add_argument("--layout-resolution", type=int, default=64,
                        help="side of the global model's canvas in pixels (sets the layout level)")
    parser.add_argument("--steps", type=int, default=None, help="patch steps; default: the preset's")
    parser.add_argument("--tile-batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--disk-megapixels", type=float, default=None,
                        help="canvases this large go to disk; default: the preset's")
    parser.add_argument("--repeats", type=int, default=5, help="model call timings (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_one(args)))
        return

    results = []
    for megapixels in args.megapixels:
        command = [sys.executable, __file__, "--child", "--megapixels", str(megapixels)]
        for flag in ("synth_preset", "patch_preset", "layout_resolution", "steps", "tile_batch",
                     "disk_megapixels", "repeats", "device"):
            value = getattr(args, flag)
            if value is not None:
                command += [f"--{flag.replace('_', '-')}", str(value)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        row = results[-1]
        print(f"{row['megapixels']:5.1f} MP  {row['synthesis_s']:8.1f} s  overhead "
              f"{row['overhead']:.3f} (CPU time {row['overhead_cpu']:.3f}, median timing "
              f"{row['overhead_median_timing']:.3f})  "
              f"peak RSS above model {row['peak_rss_above_model_mb']:7.1f} MB, above model "
              f"calls {row['peak_rss_above_model_calls_mb']:7.1f} MB  tiles "
              f"{row['tile_evaluations']}  disk {row['disk_canvas']}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
