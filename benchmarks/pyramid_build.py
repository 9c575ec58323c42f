"""Pyramid build throughput: decode only, ``build_store``, and ome-zarr-py's ``write_image``.

All three run in this process on the same real radiographs, one after the other, each ``--repeats``
times; the table shows the best run. Every variant decodes with the project's readers (DICOM VOI,
EXIF orientation, greyscale conversion) so that only the pyramid and writing differ:

- decode: files -> uint16 pixels.
- build: ``build_store(workers=0)``: decode, tent pyramid, sharded Blosc-zstd Zarr v3 with
  NGFF metadata, checksums, catalog.
- ome-zarr-py: decode, then ``ome_zarr.writer.write_image`` with ``Methods.RESIZE``
  (``skimage.transform.resize`` with anti-aliasing), the same levels, chunks, shards and
  compressor, and dask's synchronous scheduler (one thread, like the build with workers=0).

The row of all images also runs ``build_store(workers=2)`` for the parallel throughput; its time
includes starting the worker processes.

A second table reads random 64, 128 and 256 pixel patches from stores of the large JPEGs written
with several chunk and shard sizes, the access pattern of patch training.

Usage:
    python benchmarks/pyramid_build.py [--data ../shared/data/radiographs] [--small 60]
        [--large 8] [--repeats 2] [--reads 300]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from preprocess.build import build_store  # noqa: E402
from preprocess.pyramid import level_shapes  # noqa: E402
from preprocess.readers import ReadOptions, detect_kind, read_images  # noqa: E402
from preprocess.writer import ChunkLayout  # noqa: E402

DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "radiographs"
DICOM_FILES = ("RG2_UNC.dcm", "RG2_JPLL.dcm", "RG1_J2KI.dcm", "MG1_J2KI.dcm",
               "CR-ModalitySequenceLUT.dcm")
SALT = "benchmark"


def select_files(data: Path, small: int, large: int) -> tuple[list[Path], list[Path], list[Path]]:
    """Return (``small`` FracAtlas JPEGs of 373 x 454, ``large`` of 2304 x 2880, DICOM files)."""
    from PIL import Image

    small_files, large_files = [], []
    for path in sorted((data / "fracatlas" / "images").glob("*.jpg")):
        with Image.open(path) as image:
            size = image.size
        if size[0] * size[1] < 200_000 and len(small_files) < small:
            small_files.append(path)
        elif size[0] * size[1] > 6_000_000 and len(large_files) < large:
            large_files.append(path)
        if len(small_files) >= small and len(large_files) >= large:
            break
    return small_files, large_files, [data / "dicom" / name for name in DICOM_FILES]


def decode_all(files: list[Path]) -> list:
    """Decode every file with the project's readers; return the pixel arrays."""
    options = ReadOptions(salt=SALT.encode())
    return [image.pixels for path in files for image in read_images(path, detect_kind(path),
                                                                    options)]


def run_decode(files: list[Path], _: Path) -> None:
    decode_all(files)


def run_build(files: list[Path], out: Path, workers: int = 0) -> None:
    summary = build_store(files, out, workers=workers, salt=SALT)
    if summary.failed:
        raise RuntimeError(f"benchmark inputs failed: {summary.failed}")


def run_ome_zarr(files: list[Path], out: Path) -> None:
    """Decode, then write each image with ome-zarr-py's write_image and the same layout."""
    import dask
    import zarr
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    layout = ChunkLayout()
    with dask.config.set(scheduler="synchronous"):
        for index, pixels in enumerate(decode_all(files)):
            shapes = level_shapes(*pixels.shape)
            storage = []
            for shape in shapes:
                chunks, shards = layout.array_shapes(shape)
                options = {"chunks": chunks, "compressors": layout.compressors()}
                if shards is not None:
                    options["shards"] = shards
                storage.append(options)
            group = zarr.open_group(str(out / f"image{index}"), mode="w", zarr_format=3)
            write_image(pixels, group, scale_factors=[2 ** level for level in
                                                      range(1, len(shapes))],
                        method=Methods.RESIZE, axes="yx", storage_options=storage)


def best_time(function: Callable[[list[Path], Path], None], files: list[Path],
              repeats: int) -> tuple[float, float]:
    """Return the best (wall seconds, CPU seconds of this process) over ``repeats`` runs."""
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="pyramid-bench-")) / "out.zarr"
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        function(files, out)
        best_wall = min(best_wall, time.perf_counter() - started_wall)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
        shutil.rmtree(out.parent)
    return best_wall, best_cpu


def measure_group(name: str, files: list[Path], repeats: int, parallel: bool) -> dict[str, Any]:
    """Time every variant on one group of files; return the numbers of one table row."""
    megapixels = sum(pixels.size for pixels in decode_all(files)) / 1e6
    variants: dict[str, Callable[[list[Path], Path], None]] = {
        "decode": run_decode, "build": run_build, "ome_zarr": run_ome_zarr}
    if parallel:
        variants["build_2_workers"] = lambda group, out: run_build(group, out, workers=2)
    row: dict[str, Any] = {"group": name, "files": len(files), "megapixels": megapixels}
    for variant, function in variants.items():
        row[variant] = best_time(function, files, repeats)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the results as a Markdown table: megapixels per second and time ratios.

    Ratios are given for wall time and for CPU time of this process; on a shared machine the CPU
    ratio is the steadier one.
    """
    print("| images | files | MP | decode MP/s | build MP/s | ome-zarr-py MP/s | "
          "build / decode time (wall, CPU) | ome-zarr-py / build time (wall, CPU) | "
          "build, 2 workers MP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        rates = {key: row["megapixels"] / row[key][0] for key in
                 ("decode", "build", "ome_zarr", "build_2_workers") if key in row}
        parallel = f"{rates['build_2_workers']:.1f}" if "build_2_workers" in rates else ""
        slower = [row["build"][kind] / row["decode"][kind] for kind in (0, 1)]
        faster = [row["ome_zarr"][kind] / row["build"][kind] for kind in (0, 1)]
        print(f"| {row['group']} | {row['files']} | {row['megapixels']:.1f} | "
              f"{rates['decode']:.1f} | {rates['build']:.1f} | {rates['ome_zarr']:.1f} | "
              f"{slower[0]:.2f}, {slower[1]:.2f} | {faster[0]:.2f}, {faster[1]:.2f} | "
              f"{parallel} |")


def measure_reads(files: list[Path], reads: int) -> list[str]:
    """Return Markdown rows: random patch reads per second for several chunk layouts.

    Each layout stores ``files`` once; patches of 64, 128 and 256 pixels are read at random
    level-0 positions with ``PyramidStore.read_region`` (seeded, the same positions per layout).
    """
    import numpy as np

    from preprocess.store import PyramidStore

    rows = []
    for chunk, shard in ((128, 4096), (256, 4096), (128, 0), (256, 0)):
        folder = Path(tempfile.mkdtemp(prefix="pyramid-reads-"))
        build_store(files, folder / "s.zarr", workers=0, salt=SALT, chunk_size=chunk,
                    shard_size=shard)
        store = PyramidStore(folder / "s.zarr")
        images = store.rows()
        cells = []
        for size in (64, 128, 256):
            rng = np.random.default_rng(0)
            started = time.perf_counter()
            for _ in range(reads):
                row = images[rng.integers(len(images))]
                y0 = int(rng.integers(0, row.height - size))
                x0 = int(rng.integers(0, row.width - size))
                store.read_region(row.image_id, 0, y0, x0, size, size)
            cells.append(f"{reads / (time.perf_counter() - started):.0f}")
        shard_text = f"{shard} px shards" if shard else "no shards"
        rows.append(f"| {chunk} px chunks, {shard_text} | " + " | ".join(cells) + " |")
        shutil.rmtree(folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="Folder with fracatlas/ and dicom/ (default: ../shared beside "
                             "the repository).")
    parser.add_argument("--small", type=int, default=60, help="FracAtlas 373 x 454 images.")
    parser.add_argument("--large", type=int, default=8, help="FracAtlas 2304 x 2880 images.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per variant; best is shown.")
    parser.add_argument("--reads", type=int, default=300,
                        help="Random patch reads per patch size for the layout table (0: skip).")
    arguments = parser.parse_args()
    if not (arguments.data / "fracatlas").is_dir():
        parser.error(f"--data {arguments.data} has no fracatlas folder; point it at the "
                     "radiographs folder")

    import torch

    torch.set_num_threads(1)
    small, large, dicom = select_files(arguments.data, arguments.small, arguments.large)
    groups = [("FracAtlas JPEG 373 x 454", small), ("FracAtlas JPEG 2304 x 2880", large),
              ("DICOM: " + ", ".join(path.stem for path in dicom), dicom),
              ("all of the above", small + large + dicom)]
    rows = [measure_group(name, files, arguments.repeats, parallel=name.startswith("all"))
            for name, files in groups if files]
    print(f"best of {arguments.repeats} runs per variant")
    print_table(rows)
    if arguments.reads and large:
        print(f"\nrandom level-0 patch reads per second from the {len(large)} large JPEGs "
              "(PyramidStore.read_region, one thread)")
        print("| layout | 64 px | 128 px | 256 px |")
        print("|---|---|---|---|")
        print("\n".join(measure_reads(large, arguments.reads)))


if __name__ == "__main__":
    main()
