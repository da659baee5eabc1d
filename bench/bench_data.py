"""Data pipeline throughput on this CPU.

    python -m bench.bench_data shapes [--n 50000] [--size 32] [--repeats 3]
    python -m bench.bench_data stream [--n 256] [--repeats 3] [--workers 2]

``shapes``: time to generate the built-in shapes data (no cache), the figure issue 4 asks for:
50,000 images at 32×32 "in seconds".

``stream``: the path for data that does not fit in memory (issue 9 §2). It writes ``--n``
ImageNet-like JPEGs (500×375, smooth colour fields plus texture and noise, quality 90, about the
size of an ImageNet JPEG) as an ImageFolder in a temporary directory and measures, in one process
(= the rate of one loader worker), the images/s of

* ``files, previous``: what the file reader did before: PIL decode, PIL resize of the whole image
  to 224×224, float32 out of the worker;
* ``files, Resize``: ``ImageFiles.read`` resizing the whole image to 224×224 (uint8 out), the
  like-for-like replacement of the previous path;
* ``files, RandomResizedCrop``: ``ImageFiles.read`` with ``RandomResizedCrop(224)`` (decode,
  crop, antialiased resize and flip, uint8 out), the training path;
* ``files, CenterCrop``: the same with ``CenterCrop(224)``, the evaluation path;
* ``shards, RandomResizedCrop``: the same samples streamed from ``pack_shards`` tar shards;
* ``shards, tar read only``: reading the shards' members without decoding — the format's own cost;

then the end-to-end ``dataset_loader`` (RandomResizedCrop, batch 64, ``--workers`` processes, batches
delivered as float32 on the CPU) for files and shards, and the one-off ``pack_shards`` time.
Each figure is the median of ``--repeats`` passes, interleaved across the paths. The machine's load is printed: figures measured
beside other work are lower bounds.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastsat.data import (
    CenterCrop,
    RandomResizedCrop,
    Resize,
    dataset_loader,
    generate_shapes,
    image_folder,
    pack_shards,
    shards,
)
from fastsat.data.shards import ShardStream, _members


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; the repeats are interleaved (one pass of every function per
    round) so that a change of the machine's load hits all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shapes(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        generate_shapes(args.n, size=args.size, seed=repeat)
        times.append(time.perf_counter() - start)
    print(f"# shapes generation, {platform.machine()}, torch {torch.__version__}, load average {load:.2f} before the run")
    print(f"{args.n} images at {args.size}×{args.size}: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}) over {args.repeats} runs")


def _photo(rng: np.random.Generator) -> Image.Image:
    """A 500×375 image with the statistics JPEG cares about: smooth regions, edges, texture, noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    array = np.asarray(coarse, dtype=np.float32)
    yy, xx = np.mgrid[0:375, 0:500]
    array += 25 * np.sin(xx / rng.uniform(3, 12) + yy / rng.uniform(3, 12))[..., None]
    array += rng.normal(0, 6, array.shape)
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


def _write_folder(root: Path, n: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        _photo(rng).save(buffer, format="JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def _previous_path(ds) -> None:
    """The file reader before issue 9: PIL decode, PIL resize to 224, float32."""
    for record in ds.records:
        with Image.open(record.image) as raw:
            image = raw.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
        torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def bench_stream(args: argparse.Namespace) -> None:
    load = os.getloadavg()
    torch.set_num_threads(1)  # as in a loader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nbytes = _write_folder(root / "images", args.n)
        files = image_folder(root / "images", size=None)
        start = time.perf_counter()
        pack_shards(root / "images", root / "shards", shard_size=64)
        pack_s = time.perf_counter() - start
        packed = shards(root / "shards", size=None)
        crop, centre = RandomResizedCrop(224), CenterCrop(224)

        def read_all(transform):
            rng = random.Random(0)
            for i in range(len(files)):
                files.read(i, transform, rng)

        def tar_only():
            for path, count in zip(packed.files, packed.counts):
                for _ in _members(path, 0, count):
                    pass

        per_worker = {
            "files, previous (PIL resize to 224, float32 out)": lambda: _previous_path(files),
            "files, Resize(224), uint8 out": lambda: read_all(Resize(224)),
            "files, RandomResizedCrop(224), uint8 out": lambda: read_all(crop),
            "files, CenterCrop(224), uint8 out": lambda: read_all(centre),
            "shards, RandomResizedCrop(224), uint8 out": lambda: list(ShardStream(packed, transform=crop)),
            "shards, tar read only (no decode)": tar_only,
        }
        rows = [(name, args.n / t) for name, t in _median_times(per_worker, args.repeats).items()]
        torch.set_num_threads(2)
        loaders = {name: dataset_loader(data, batch_size=64, shuffle=True, transform=crop, num_workers=args.workers)
                   for name, data in (("files", files), ("shards", packed))}  # fmt: skip
        for batches in loaders.values():
            list(batches)  # start the workers
        end_to_end = _median_times({name: lambda b=b: list(b) for name, b in loaders.items()}, args.repeats)
        end_to_end = [(name, args.n / t) for name, t in end_to_end.items()]
    print(f"# Streaming input pipeline, {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"Pillow {Image.__version__}; load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) before the run")
    print(f"{args.n} JPEGs 500×375 (mean {nbytes / args.n / 1024:.0f} KiB), output 224×224; median of {args.repeats} passes")
    print("\n| path, one process (= one worker) | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")
    print(f"\n| end to end: dataset_loader(RandomResizedCrop(224), batch 64, {args.workers} workers) | images/s |\n|---|---|")
    for name, rate in end_to_end:
        print(f"| {name} | {rate:.0f} |")
    print(f"\npack_shards: {pack_s:.2f} s for {args.n} images ({args.n / pack_s:.0f} images/s, one process, "
          f"every image decoded once to check it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    shapes_parser = sub.add_parser("shapes", help="shapes generation time")
    shapes_parser.add_argument("--n", type=int, default=50_000, help="images (default: 50000)")
    shapes_parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    shapes_parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    stream_parser = sub.add_parser("stream", help="JPEG decode + augmentation images/s, files and shards")
    stream_parser.add_argument("--n", type=int, default=256, help="JPEG files (default: 256)")
    stream_parser.add_argument("--repeats", type=int, default=5, help="timed passes (default: 5)")
    stream_parser.add_argument("--workers", type=int, default=2, help="loader workers end to end (default: 2)")
    args = parser.parse_args()
    (bench_shapes if args.what == "shapes" else bench_stream)(args)


if __name__ == "__main__":
    main()
