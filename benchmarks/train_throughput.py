"""Benchmark femurgen's training loop against a plain PyTorch loop of the same model.

Both loops train the same ``LayoutUNet`` (a diffusers ``UNet2DModel`` with the layout
conditioning) from the same initial weights, with the same DDPM noise scheduler, AdamW
settings, micro-batches (shape and content) and autocast mode:

* ours: ``Trainer.fit`` on ``GlobalTask``. Every sample is read from the pyramid store
  through the DataLoader and gets its noise and timestep from per-sample generators. Every
  step adds the EMA update, gradient-norm clipping, non-finite checks and the progress
  bar, and every log interval a status line;
* plain: the micro-batches preloaded in memory, ``torch.randn`` noise, forward, MSE,
  backward and ``optimizer.step()``, nothing else.

Images per second are measured over ``--steps`` optimizer steps after ``--warmup`` steps,
alternating plain and ours for ``--rounds`` rounds, in wall-clock time and in CPU time of
this process. Other jobs sharing the cores barely change CPU time, while they can halve
wall-clock rates. So on the CPU the overhead is the ratio of the median CPU-time rates,
measured with one torch thread (idle OpenMP threads spin and would count as CPU time), and
on a GPU it is the ratio of the median wall-clock rates. Our timed segment is a second
``fit`` call that resumes the warm-up run, so it includes the trainer's start-up, the resume
and the final checkpoint. A checkpoint write and a sample grid are also timed once each (on
the same basis) and reported as the share of training time they add at the preset's
intervals. With ``--device cuda`` the peak GPU memory of each loop is reported too.

Commands behind the numbers in docs/benchmarks.md:

    .venv/bin/python benchmarks/train_throughput.py --threads 1 --json /tmp/femurgen-bench/train-fp32.json
    .venv/bin/python benchmarks/train_throughput.py --threads 1 --set train.mixed_precision=bf16 \
        --json /tmp/femurgen-bench/train-bf16.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchgen.config import load_stage_config, to_dict  # noqa: E402
from patchgen.diffusion import training_scheduler  # noqa: E402
from patchgen.global_model import GlobalConfig, GlobalTask  # noqa: E402
from patchgen.trainer import Trainer, seeded_init  # noqa: E402

RADIOGRAPHS = REPO.parent / "shared" / "data" / "radiographs"
FRACATLAS_SIZES = (("373", "454"), ("454", "373"), ("2304", "2880"))   # (width, height) in labels.csv


def build_store(folder: Path, per_size_and_label: int) -> Path:
    """Build a store of FracAtlas radiographs of three sizes and both labels."""
    from preprocess.build import build_store as build

    labels_csv = RADIOGRAPHS / "fracatlas" / "labels.csv"
    if not labels_csv.is_file():
        raise SystemExit(f"{labels_csv} not found; pass --store with an existing pyramid store")
    with open(labels_csv, newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    files = []
    for size in FRACATLAS_SIZES:
        for label in ("fractured", "non_fractured"):
            matching = [r for r in records if (r["width"], r["height"]) == size and r["label"] == label]
            files += [RADIOGRAPHS / "fracatlas" / r["file"] for r in matching[:per_size_and_label]]
    store = folder / "store.zarr"
    build(files, store, labels_csv=labels_csv, workers=1, split="1,0,0")
    return store


def load_config(preset: str, overrides: list[str]) -> GlobalConfig:
    config, _ = load_stage_config(GlobalConfig, "global", preset, overrides)
    return config


def make_task(store_path: Path, config: GlobalConfig) -> GlobalTask:
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    rows = store.rows(split=config.split)
    with seeded_init(config.train.seed):
        return GlobalTask(store, rows, sorted({r.label for r in rows}), config)


def preload_micro_batches(task: GlobalTask, config: GlobalConfig, count: int, device) -> list[dict]:
    """Collate the first ``count`` micro-batches of the trainer's order onto ``device``."""
    order = task.sample_order(config.train.batch_size, config.train.seed)
    dataset = task.dataset()
    batches = []
    for index in range(count):
        batch = torch.utils.data.default_collate([dataset[key] for key in order.micro_batch(index)])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def autocast(config: GlobalConfig, device: torch.device):
    enabled = config.train.mixed_precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class Clock:
    """Wall-clock and process CPU time between ``start`` and ``stop``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        synchronize(self.device)
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def plain_loop(task: GlobalTask, config: GlobalConfig, batches: list[dict], warmup: int,
               device: torch.device) -> tuple[float, float]:
    """Images per wall-clock and per CPU second of forward, loss, backward and AdamW step."""
    with seeded_init(config.train.seed):
        network = make_task_network(task, config).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.train.lr,
                                  betas=tuple(config.train.adam_betas),
                                  weight_decay=config.train.weight_decay)
    scheduler = training_scheduler(config.diffusion)
    accum = config.train.grad_accum
    steps = len(batches) // accum
    clock = Clock(device)
    for step in range(steps):
        if step == warmup:
            clock.start()
        optimizer.zero_grad(set_to_none=True)
        for batch in batches[step * accum:(step + 1) * accum]:
            x0 = batch["x0"]
            noise = torch.randn_like(x0)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],),
                                      device=device)
            with autocast(config, device):
                output = network(scheduler.add_noise(x0, noise, timesteps), timesteps,
                                 batch["mask"], batch["label"], batch["size"])
                loss = F.mse_loss(output.float(), noise)
            (loss / accum).backward()
        optimizer.step()
    wall, cpu = clock.stop()
    images = (steps - warmup) * accum * config.train.batch_size
    return images / wall, images / cpu


def make_task_network(task: GlobalTask, config: GlobalConfig) -> torch.nn.Module:
    """Build a fresh network of the task's architecture (same initial weights under the same seed)."""
    from patchgen.networks import LayoutUNet

    model = config.model
    return LayoutUNet(resolution=model.resolution, channels=tuple(model.channels),
                      layers_per_block=model.layers_per_block, attention_from=model.attention_from,
                      norm_groups=model.norm_groups, num_labels=len(task.label_names))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def our_loop(store_path: Path, config_factory, run_dir: Path, warmup: int, steps: int,
             device: str) -> tuple[float, float, Trainer]:
    """Images per wall-clock and per CPU second of ``Trainer.fit`` resuming a warm-up run."""
    shutil.rmtree(run_dir, ignore_errors=True)
    trainers = []
    for duration_steps in (warmup, warmup + steps):
        config = config_factory()
        train = config.train
        step_samples = train.batch_size * train.grad_accum
        train.duration = duration_steps * step_samples
        train.log_every = train.checkpoint_every = warmup * step_samples
        train.sample_every = 0
        task = make_task(store_path, config)
        clock = Clock(torch.device(device))
        clock.start()
        trainer = Trainer(task, train, run_dir, to_dict(config), device=device)
        trainer.fit()
        wall, cpu = clock.stop()
        trainers.append(trainer)
    images = steps * step_samples
    return images / wall, images / cpu, trainers[-1]


def timed(function, basis: str, device: torch.device) -> float:
    """Seconds ``function`` takes: wall clock for ``basis`` "wall", else process CPU time."""
    clock = Clock(device)
    clock.start()
    function()
    wall, cpu = clock.stop()
    return wall if basis == "wall" else cpu


def periodic_costs(trainer: Trainer, images_per_s: float, preset: GlobalConfig, basis: str,
                   device: torch.device) -> dict[str, float]:
    """Seconds of one checkpoint and one sample grid, and their share of training time."""
    checkpoint_s = timed(trainer.save_checkpoint, basis, device)
    grid_s = timed(trainer._write_samples, basis, device)
    train_s_per_checkpoint = preset.train.checkpoint_every / images_per_s
    costs = {"checkpoint_s": checkpoint_s,
             "checkpoint_share": checkpoint_s / train_s_per_checkpoint, "sample_grid_s": grid_s}
    if preset.train.sample_every:
        costs["sample_grid_share"] = grid_s / (preset.train.sample_every / images_per_s)
    return costs


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="femurgen-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store = Path(args.store) if args.store else build_store(work, args.images)
    config = load_config(args.preset, args.set)
    task = make_task(store, config)
    batches = preload_micro_batches(task, config, (args.warmup + args.steps) * config.train.grad_accum,
                                    device)

    rates = {"plain_wall": [], "plain_cpu": [], "ours_wall": [], "ours_cpu": []}
    peaks = {"plain": 0, "ours": 0}
    trainer = None
    for round_index in range(args.rounds):
        reset_peak(device)
        wall, cpu = plain_loop(task, config, batches, args.warmup, device)
        rates["plain_wall"].append(wall)
        rates["plain_cpu"].append(cpu)
        peaks["plain"] = max(peaks["plain"], peak_bytes(device))
        reset_peak(device)
        wall, cpu, trainer = our_loop(store, lambda: load_config(args.preset, args.set),
                                      work / "run", args.warmup, args.steps, args.device)
        rates["ours_wall"].append(wall)
        rates["ours_cpu"].append(cpu)
        peaks["ours"] = max(peaks["ours"], peak_bytes(device))
        logging.info("round %d: %s", round_index, {k: round(v[-1], 3) for k, v in rates.items()})

    medians = {k: statistics.median(v) for k, v in rates.items()}
    basis = "wall" if device.type == "cuda" else "cpu"
    result = {"preset": args.preset, "overrides": args.set, "device": str(device),
              "threads": torch.get_num_threads(), "batch_size": config.train.batch_size,
              "grad_accum": config.train.grad_accum, "canvases": repr(task.plan.counts()),
              "mixed_precision": config.train.mixed_precision, "warmup_steps": args.warmup,
              "steps": args.steps, "rounds": args.rounds, "images_per_s": rates,
              "medians": medians, "overhead_basis": basis,
              "overhead": medians[f"plain_{basis}"] / medians[f"ours_{basis}"],
              "overhead_wall": medians["plain_wall"] / medians["ours_wall"],
              **periodic_costs(trainer, medians[f"ours_{basis}"], load_config(args.preset, []),
                               basis, device)}
    if device.type == "cuda":
        result["peak_memory_gib"] = {k: v / 2**30 for k, v in peaks.items()}
    return result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def print_table(result: dict) -> None:
    print(f"preset {result['preset']} {result['overrides']}, {result['device']}, "
          f"{result['threads']} threads, batch {result['batch_size']} x {result['grad_accum']}, "
          f"{result['mixed_precision']}, canvases {result['canvases']}")
    rates, medians = result["images_per_s"], result["medians"]
    print("| loop | images/s, CPU time (median) | images/s, wall clock (median) | rounds (CPU time) |")
    print("|---|---|---|---|")
    for name, title in (("plain", "plain PyTorch"), ("ours", "femurgen Trainer")):
        print(f"| {title} | {medians[name + '_cpu']:.2f} | {medians[name + '_wall']:.2f} | "
              f"{', '.join(f'{r:.2f}' for r in rates[name + '_cpu'])} |")
    print(f"overhead (plain / ours, {result['overhead_basis']} time): {result['overhead']:.3f}x; "
          f"wall clock: {result['overhead_wall']:.3f}x")
    print(f"checkpoint: {result['checkpoint_s']:.2f} s ({100 * result['checkpoint_share']:.2f}% "
          f"of training at the preset interval); sample grid: {result['sample_grid_s']:.2f} s"
          + (f" ({100 * result['sample_grid_share']:.1f}%)" if "sample_grid_share" in result else ""))
    if "peak_memory_gib" in result:
        print(f"peak GPU memory: {result['peak_memory_gib']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="existing pyramid store; default: build one from FracAtlas")
    parser.add_argument("--work", help="folder for the store and the run (default: a temporary one)")
    parser.add_argument("--images", type=int, default=4,
                        help="FracAtlas images per size and label when building the store")
    parser.add_argument("--preset", default="cpu-tiny", help="global preset name or YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as train-global --set; repeatable")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing")
    parser.add_argument("--steps", type=int, default=30,
                        help="timed optimizer steps per loop and round (a multiple of --warmup)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/ours rounds")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error(f"--steps {args.steps} must be a multiple of --warmup {args.warmup}")
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
