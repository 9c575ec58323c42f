"""Benchmark the patch loader against the rate at which patch training consumes patches.

Steps:

1. Build (once, or reuse) a pyramid store of real radiographs: FracAtlas JPEGs of every size
   (373 x 454 up to 2304 x 2880) and DICOM files up to the 3064 x 4664 mammogram.
2. Loader: patches per second of ``PatchDataset`` through a ``DataLoader`` fed by the
   trainer's batch sampler, with 0, 1 and 2 worker processes, for the data settings of each
   preset. The first batch (worker start-up) is timed separately. With 0 workers the CPU
   time per patch on one torch thread (as in a worker) is measured too.
3. Patch positions: chunks read and CPU time per sample, and the sampling bias, of
   ``data.position`` ``aligned`` against ``chunk``. The bias is the coverage of the
   least-covered pixel, relative to the mean, along one axis of a large image (1 = uniform).
4. Training on the CPU: median wall time of one optimizer step (every phase: forward,
   backward, AdamW step) of the CPU presets on real batches, and its CPU time on one thread.
5. Training on a GPU, estimated: FLOPs of one optimizer step of the GPU presets counted with
   ``torch.utils.flop_counter.FlopCounterMode`` (on the meta device, so nothing runs), divided
   by an assumed sustained throughput (``--tflops``).
6. Headroom: loader patches per second over training patches per second.

CPU times are reported because wall times on a machine shared with other work vary several
fold from run to run, while the CPU time of a single-threaded loop barely changes.

Command behind the numbers in docs/benchmarks.md:

    .venv/bin/python benchmarks/patch_loader.py --store /tmp/femurgen-bench/patch-store.zarr \\
        --json /tmp/femurgen-bench/patch_loader.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchgen.config import load_stage_config  # noqa: E402
from patchgen.data_order import RankBatchSampler, ShuffledOrder  # noqa: E402
from patchgen.patch_data import PatchDataConfig, PatchDataset  # noqa: E402
from patchgen.patch_gan import (PatchDiscriminator, PatchGanTask, build_generator,  # noqa: E402
                                gan_config)
from patchgen.patch_model import PatchConfig, PatchDiffusionTask, build_patch_unet  # noqa: E402

RADIOGRAPHS = REPO.parent / "shared" / "data" / "radiographs"
FRACATLAS_SIZES = {("2304", "2880"): 4, ("1760", "2140"): 2, ("373", "454"): 4, ("454", "373"): 2}
DICOM_FILES = ("MG1_J2KI.dcm", "RG2_JPLL.dcm", "RG1_UNCR.dcm", "CR-ModalitySequenceLUT.dcm")
H100_BF16_DENSE_PEAK_TFLOPS = 989.0   # NVIDIA H100 SXM5 data sheet, dense bf16 tensor cores
CPU_PRESETS = ("cpu-tiny", "gan-cpu-tiny")
GPU_PRESETS = ("gpu", "gan-gpu")


def fracatlas_sources() -> list[Path]:
    """Return FracAtlas files of each listed size, half of them of each label."""
    fracatlas = RADIOGRAPHS / "fracatlas"
    with open(fracatlas / "labels.csv", newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    sources = []
    for size, count in FRACATLAS_SIZES.items():
        for label in ("fractured", "non_fractured"):
            matching = [r["file"] for r in records
                        if (r["width"], r["height"]) == size and r["label"] == label]
            sources += [fracatlas / name for name in matching[:count // 2]]
    return sources


def open_store(path: Path):
    """Open the benchmark store, building it first when it does not exist."""
    from preprocess.build import build_store
    from preprocess.store import PyramidStore

    if not (path / "catalog.csv").is_file():
        if not RADIOGRAPHS.is_dir():
            sys.exit(f"real radiographs not found at {RADIOGRAPHS}; pass --store with a "
                     f"built store")
        options = {"workers": 2, "split": "1,0,0", "salt": "femurgen-benchmark"}
        # The label table lists FracAtlas files only, and a file it does not list fails, so
        # the DICOM files go in a second build of the same store, labelled "unlabeled".
        print(build_store(fracatlas_sources(), path,
                          labels_csv=RADIOGRAPHS / "fracatlas" / "labels.csv", **options))
        print(build_store([RADIOGRAPHS / "dicom" / name for name in DICOM_FILES], path,
                          **options), flush=True)
    return PyramidStore(path)


def preset(name: str) -> PatchConfig:
    config, _ = load_stage_config(PatchConfig, "patch", name)
    return config


def make_loader(store, data: PatchDataConfig, batch_size: int, workers: int, seed: int):
    """Build a DataLoader as the trainer does, over every image of the store."""
    rows = store.rows()
    dataset = PatchDataset(store, rows, sorted({r.label for r in rows}), data)
    order = ShuffledOrder(len(rows), batch_size, seed)
    sampler = RankBatchSampler(order, start_step=0, grad_accum=1, world_size=1, rank=0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       persistent_workers=workers > 0)


@contextlib.contextmanager
def one_torch_thread():
    """Run torch operators on one thread inside the block, as DataLoader workers do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_batches(iterator, batches: int) -> tuple[int, float, float]:
    """Read ``batches`` batches; return patches, wall seconds and CPU seconds of this process."""
    started, cpu_started = time.perf_counter(), time.process_time()
    patches = 0
    for _ in range(batches):
        patches += next(iterator)["x0"].shape[0]
    return patches, time.perf_counter() - started, time.process_time() - cpu_started


def loader_rate(store, data: PatchDataConfig, batch_size: int, workers: int,
                batches: int) -> dict[str, float | None]:
    """Measure patches per second after the first batch, and the time to the first batch.

    With 0 workers the batches are read a second time on one torch thread, as in a
    DataLoader worker, to measure the CPU time per patch. Unlike wall time, CPU time barely
    depends on other processes sharing the cores.
    """
    started = time.perf_counter()
    iterator = iter(make_loader(store, data, batch_size, workers, seed=workers))
    next(iterator)
    first = time.perf_counter() - started
    patches, seconds, _ = time_batches(iterator, batches)
    del iterator
    cpu_ms = None
    if workers == 0:
        with one_torch_thread():
            iterator = iter(make_loader(store, data, batch_size, 0, seed=0))
            next(iterator)
            cpu_patches, _, cpu_seconds = time_batches(iterator, batches)
        cpu_ms = 1000 * cpu_seconds / cpu_patches
    return {"workers": workers, "patches_per_s": patches / seconds, "first_batch_s": first,
            "cpu_ms_per_patch_1_thread": cpu_ms}


def single_size(data: PatchDataConfig, size: int) -> PatchDataConfig:
    """Return ``data`` with every patch of ``size`` pixels (no mixed sizes)."""
    return dataclasses.replace(data, patch_size=size, large_patch_size=0, large_probability=0.0)


def loader_rows(store, name: str, workers: list[int], batches: int) -> list[dict]:
    """Measure the loader rates of a preset's data settings at each worker count.

    With mixed patch sizes the few large batches make the mixed rate noisy. So each size is
    also measured alone with 0 workers, and ``headroom`` weights those by the large share.
    """
    config = preset(name)
    batch = config.train.batch_size
    variants = [(name, config.data, workers)]
    if config.data.large_probability > 0:
        variants += [(f"{name}, {size} px only", single_size(config.data, size), [0])
                     for size in (config.data.patch_size, config.data.large_patch_size)]
    rows = []
    for label, data, counts in variants:
        for count in counts:
            rate = loader_rate(store, data, batch, count, batches)
            rows.append({"preset": label, "patch": data.patch_size, "batch": batch, **rate})
    return rows


def chunks_touched(start: int, size: int, length: int, chunk: int) -> int:
    """Count the chunks of one axis that [start, start + size) touches inside [0, length)."""
    first, last = max(start, 0), min(start + size, length) - 1
    return 0 if last < first else last // chunk - first // chunk + 1


def chunk_reads(store, dataset: PatchDataset, key: tuple[int, int]) -> tuple[int, float]:
    """Read the sample of ``key``; return its chunk count and CPU seconds.

    The chunks are those of the target region at level ``l`` plus those of the crop of
    level ``l + k`` with its one-pixel margin.
    """
    image_id = dataset.rows[key[0]].image_id
    size = dataset.config.patch_size
    started = time.process_time()
    sample = dataset.sample(key, size)
    seconds = time.process_time() - started

    level, (y0, x0) = int(sample["level"]), sample["origin"].tolist()
    gap = dataset.config.level_gap
    factor = 2 ** gap
    reads = [(level, y0, x0, size),
             (level + gap, y0 // factor - 1, x0 // factor - 1, size // factor + 2)]
    total = 0
    for read_level, top, left, extent in reads:
        height, width = store.level_shape(image_id, read_level)
        chunk_y, chunk_x = store.chunk_shape(image_id, read_level)
        total += (chunks_touched(top, extent, height, chunk_y)
                  * chunks_touched(left, extent, width, chunk_x))
    return total, seconds


def position_costs(store, data: PatchDataConfig, samples: int) -> dict[str, float]:
    """Measure mean chunks read and CPU milliseconds (one thread) over ``samples`` samples."""
    rows = store.rows()
    dataset = PatchDataset(store, rows, sorted({r.label for r in rows}), data)
    order = ShuffledOrder(len(rows), batch_size=samples, seed=1)
    with one_torch_thread():
        results = [chunk_reads(store, dataset, key) for key in order.micro_batch(0)]
    chunks, seconds = zip(*results)
    return {"chunks_per_sample": float(np.mean(chunks)),
            "cpu_ms_per_sample_1_thread": 1000 * float(np.mean(seconds))}


def coverage_bias(store, data: PatchDataConfig, draws: int) -> dict[str, float]:
    """Measure how ``draws`` patch origins cover the rows of the largest image's level 0.

    Returns the least-covered interior row relative to the mean (interior: at least one patch
    from the border) and the share of patches whose rows span more than one chunk.
    """
    rows = store.rows()
    dataset = PatchDataset(store, rows, sorted({r.label for r in rows}), data)
    row = max(rows, key=lambda r: r.height * r.width)
    shape = store.level_shape(row.image_id, 0)
    chunk = store.chunk_shape(row.image_id, 0)[0]
    size = data.patch_size
    rng = np.random.default_rng(0)
    origins = np.array([dataset.draw_origin(rng, row.image_id, 0, shape, size)[0]
                        for _ in range(draws)])

    first, last = np.clip(origins, 0, shape[0]), np.clip(origins + size, 0, shape[0])
    changes = np.zeros(shape[0] + 1)
    np.add.at(changes, first, 1)
    np.add.at(changes, last, -1)
    coverage = np.cumsum(changes)[:shape[0]]
    interior = coverage[size:shape[0] - size]
    straddling = (last - 1) // chunk != first // chunk
    return {"min_over_mean_coverage": float(interior.min() / interior.mean()),
            "straddling_share": float(straddling.mean()), "image_rows": shape[0],
            "chunk_rows": chunk}


def batches_for(task, config: PatchConfig, count: int) -> list[dict]:
    dataset = task.dataset()
    order = ShuffledOrder(len(dataset), config.train.batch_size, seed=2)
    collate = torch.utils.data.default_collate
    return [collate([dataset.sample(key, config.data.patch_size) for key in order.micro_batch(i)])
            for i in range(count)]


def step_times(task, optimizers: dict, batches: list[dict]) -> tuple[list[float], list[float]]:
    """Time one optimizer step (every phase) per batch; return wall and CPU seconds."""
    wall, cpu = [], []
    for batch in batches:
        started, cpu_started = time.perf_counter(), time.process_time()
        for phase in task.phases:
            optimizers[phase].zero_grad(set_to_none=True)
            loss, _ = task.loss(phase, task.networks, batch)
            loss.backward()
            optimizers[phase].step()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return wall, cpu


def training_rate(store, name: str, steps: int) -> dict[str, float]:
    """Time the optimizer steps of a preset on real batches (medians).

    Wall time with torch's default threads (as ``train-patch`` runs), and the CPU time of
    the same steps on one thread, which other processes on the machine barely change.
    """
    config = preset(name)
    rows = store.rows()
    labels = sorted({r.label for r in rows})
    torch.manual_seed(0)
    task_class = PatchGanTask if config.model == "gan" else PatchDiffusionTask
    task = task_class(store, rows, labels, config)
    optimizers = {n: torch.optim.AdamW(net.parameters(), lr=config.train.lr,
                                       betas=tuple(config.train.adam_betas))
                  for n, net in task.networks.items()}
    batches = batches_for(task, config, steps + 1)
    wall, _ = step_times(task, optimizers, batches)
    with one_torch_thread():
        _, cpu = step_times(task, optimizers, batches)
    step_s = statistics.median(wall[1:])
    return {"preset": name, "batch": config.train.batch_size, "patch": config.data.patch_size,
            "threads": torch.get_num_threads(), "step_s": step_s,
            "patches_per_s": config.train.batch_size / step_s,
            "cpu_s_per_step_1_thread": statistics.median(cpu[1:])}


def meta_inputs(batch: int, size: int, noise_channels: int = 1) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {"noise": torch.randn(batch, noise_channels, size, size),
                "x": torch.randn(batch, 1, size, size), "cond": torch.randn(batch, 1, size, size),
                "coords": torch.randn(batch, 2, size, size),
                "mask": torch.ones(batch, 1, size, size),
                "label": torch.zeros(batch, dtype=torch.long),
                "level": torch.zeros(batch, dtype=torch.long),
                "t": torch.zeros(batch, dtype=torch.long)}


def diffusion_step_flops(config: PatchConfig, size: int) -> float:
    """Count the FLOPs of one forward and backward pass of the patch UNet on a micro-batch."""
    with torch.device("meta"):
        network = build_patch_unet(config, num_labels=2)
    inputs = meta_inputs(config.train.batch_size, size)
    with FlopCounterMode(display=False) as counter:
        output = network(inputs["x"], inputs["t"], inputs["cond"], inputs["coords"],
                         inputs["mask"], inputs["label"], inputs["level"], inputs["t"])
        output.float().square().mean().backward()
    return float(counter.get_total_flops())


def gan_step_flops(config: PatchConfig, size: int) -> float:
    """Count the FLOPs of a discriminator and a generator phase, R1 spread over its interval."""
    gan = gan_config(config)
    with torch.device("meta"):
        generator = build_generator(config, num_labels=2)
        discriminator = PatchDiscriminator(tuple(gan.disc_channels), num_labels=2,
                                           spectral_norm=gan.spectral_norm)
    inputs = meta_inputs(config.train.batch_size, size, gan.noise_channels)
    shared = (inputs["cond"], inputs["coords"], inputs["mask"], inputs["label"], inputs["level"])
    with FlopCounterMode(display=False) as phases:
        with torch.no_grad():
            fake = generator(inputs["noise"], *shared)
        loss = discriminator(inputs["x"], *shared).mean() + discriminator(fake, *shared).mean()
        loss.backward()
        discriminator(generator(inputs["noise"], *shared), *shared).mean().backward()
    # FlopCounterMode's module hooks reject torch.autograd.grad, so the R1 gradient is taken
    # with backward(inputs=...), which the counter accepts.
    real = inputs["x"].requires_grad_(True)
    with FlopCounterMode(display=False) as r1, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        discriminator(real, *shared).sum().backward(create_graph=True, inputs=[real])
        real.grad.square().sum().backward()
    return float(phases.get_total_flops() + r1.get_total_flops() / gan.r1_interval)


def gpu_estimate(name: str, tflops: float) -> dict[str, float]:
    """Estimate patches per second of a GPU preset at ``tflops`` sustained, from its FLOPs."""
    config = preset(name)
    count = gan_step_flops if config.model == "gan" else diffusion_step_flops
    flops = count(config, config.data.patch_size)
    if config.data.large_probability > 0:
        large = count(config, config.data.large_patch_size)
        flops = (1 - config.data.large_probability) * flops + config.data.large_probability * large
    step_s = flops / (tflops * 1e12)
    return {"preset": name, "batch": config.train.batch_size, "patch": config.data.patch_size,
            "tflop_per_step": flops / 1e12, "step_s": step_s,
            "patches_per_s": config.train.batch_size / step_s,
            "num_workers": config.train.num_workers}


def format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [format_cell(value) for value in row.values()]
        print("| " + " | ".join(cells) + " |")


def run(args: argparse.Namespace) -> dict:
    store = open_store(args.store)
    rows = store.rows()
    print(f"store {args.store}: {len(rows)} images, "
          f"{sum(r.height * r.width for r in rows) / 1e6:.1f} megapixels at level 0, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    results: dict = {"loader": [], "positions": [], "cpu_training": [], "gpu_estimate": []}
    for name in CPU_PRESETS[:1] + GPU_PRESETS:
        results["loader"] += loader_rows(store, name, args.workers, args.batches)
    for position in ("aligned", "chunk"):
        data = PatchDataConfig(patch_size=64, position=position)
        results["positions"].append({"position": position,
                                     **position_costs(store, data, args.position_samples),
                                     **coverage_bias(store, data, args.draws)})
    for name in CPU_PRESETS:
        results["cpu_training"].append(training_rate(store, name, args.train_steps))
    for name in GPU_PRESETS:
        results["gpu_estimate"].append(gpu_estimate(name, args.tflops))
    results["headroom"] = headroom(results)
    for title, table in results.items():
        print_table(title, table)
    return results


def headroom(results: dict) -> list[dict]:
    """Divide loader patches per second by training patches per second, per preset.

    CPU presets: the measured loader rate at each worker count over the measured step rate
    (the CPU presets share one data section, so cpu-tiny's loader serves both), and the same
    from CPU times on one core each. GPU presets:
    ``num_workers`` cores, each loading one patch per CPU time per patch measured with 0
    workers, over the estimated step rate. That estimate assumes ``num_workers`` free cores
    as fast as this machine's.
    """
    loader = {(r["preset"], r["workers"]): r["patches_per_s"] for r in results["loader"]}
    cpu_ms = {r["preset"]: r["cpu_ms_per_patch_1_thread"] for r in results["loader"]
              if r["workers"] == 0}
    for name in GPU_PRESETS:
        data = preset(name).data
        if data.large_probability > 0:
            base = cpu_ms[f"{name}, {data.patch_size} px only"]
            large = cpu_ms[f"{name}, {data.large_patch_size} px only"]
            cpu_ms[name] = (1 - data.large_probability) * base + data.large_probability * large
    rows = []
    for training in results["cpu_training"]:
        for (name, workers), rate in loader.items():
            if name == CPU_PRESETS[0]:
                rows.append({"preset": training["preset"], "loader": f"{workers} workers, measured",
                             "loader_patches_per_s": rate,
                             "training_patches_per_s": training["patches_per_s"],
                             "ratio": rate / training["patches_per_s"]})
        loader_per_core = 1000 / cpu_ms[CPU_PRESETS[0]]
        training_per_core = training["batch"] / training["cpu_s_per_step_1_thread"]
        rows.append({"preset": training["preset"], "loader": "one core each, from CPU time",
                     "loader_patches_per_s": loader_per_core,
                     "training_patches_per_s": training_per_core,
                     "ratio": loader_per_core / training_per_core})
    for estimate in results["gpu_estimate"]:
        if cpu_ms.get(estimate["preset"]) is None:
            continue
        rate = estimate["num_workers"] * 1000 / cpu_ms[estimate["preset"]]
        rows.append({"preset": estimate["preset"],
                     "loader": f"{estimate['num_workers']} cores, estimated from CPU time",
                     "loader_patches_per_s": rate,
                     "training_patches_per_s": estimate["patches_per_s"],
                     "ratio": rate / estimate["patches_per_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/femurgen-bench/patch-store.zarr"),
                        help="Pyramid store to read; built from ../shared/data/radiographs "
                             "when it does not exist.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="DataLoader worker counts to measure.")
    parser.add_argument("--batches", type=int, default=30,
                        help="Batches timed per loader measurement, after the first.")
    parser.add_argument("--position-samples", type=int, default=400,
                        help="Samples read per patch-position mode.")
    parser.add_argument("--draws", type=int, default=100_000,
                        help="Patch origins drawn per position mode for the coverage bias.")
    parser.add_argument("--train-steps", type=int, default=5,
                        help="Timed optimizer steps per CPU preset, after one warm-up step.")
    parser.add_argument("--tflops", type=float, default=250.0,
                        help="Assumed sustained bf16 TFLOP/s of the GPU for the estimate.")
    args = parser.parse_args()
    results = run(args)
    results["assumed_tflops"] = args.tflops
    results["h100_bf16_dense_peak_tflops"] = H100_BF16_DENSE_PEAK_TFLOPS
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
