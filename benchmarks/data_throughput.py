"""Clips/s through the full loader (shards -> decode -> sample -> batch) against raw decord
decode of the same clips, in one run, for 0, 1 and 2 loader workers; with --foreign, shards of
other tools (whole videos at 256x256 and 640x360) read as they are against after `prepare shards`.

    python benchmarks/data_throughput.py [--size 64] [--batches 100]
    python benchmarks/data_throughput.py --foreign --batches 20

The raw baseline holds every clip's mp4 bytes in memory and decodes the same 16 frames with
decord in one process: the ceiling for one worker. Also measured: the loader's check of each
sample's checksum (CRC-32 of its members) as a share of that decode. The loader's rate is
measured from its first batch to its last (worker start-up is reported separately, as it is
paid once per epoch).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import decord
import numpy as np
import webdataset as wds

from worldmodel.data.pipeline import ClipLoader, ClipSpec, ClipStream, verify_checksums
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.sources.folder import ClipSettings, prepare_videos
from worldmodel.data.sources.sample import SAMPLE_FILES, SAMPLE_SETTINGS, sample_footage_dir
from worldmodel.data.sources.shards import prepare_shards
from worldmodel.data.video import encode_mp4, iter_frames, resize_frame


def raw_decode_rate(urls: list[str], frames: int, clips: int) -> float:
    payloads = [sample["mp4"] for sample in wds.WebDataset(urls, shardshuffle=False)]
    started = time.perf_counter()
    for number in range(clips):
        reader = decord.VideoReader(io.BytesIO(payloads[number % len(payloads)]), num_threads=1)
        reader.get_batch(list(range(frames))).asnumpy()
    return clips / (time.perf_counter() - started)


def checksum_share(urls: list[str], frames: int, clips: int) -> float:
    """Time of checking a sample's members against its checksums / time of decoding its clip."""
    samples = list(wds.WebDataset(urls, shardshuffle=False))[:clips]
    started = time.perf_counter()
    for sample in samples:
        verify_checksums(sample, json.loads(sample["json"]))
    checking = time.perf_counter() - started
    started = time.perf_counter()
    for sample in samples:
        decord.VideoReader(io.BytesIO(sample["mp4"]), num_threads=1).get_batch(list(range(frames))).asnumpy()
    return checking / (time.perf_counter() - started)


def loader_rate(
    urls: list[str], spec: ClipSpec, batch_size: int, batches: int, workers: int
) -> tuple[float, float]:
    stream = ClipStream(urls, spec, batch_size, train=True, batches_per_epoch=batches)
    started = time.perf_counter()
    iterator = iter(ClipLoader(stream, num_workers=workers))
    next(iterator)
    first = time.perf_counter()
    rest = sum(len(batch["key"]) for batch in iterator)
    return rest / (time.perf_counter() - first), first - started


def foreign_shard(width: int, height: int, out: Path) -> str:
    """The sample videos, whole, re-encoded at width x height, as another tool shards them
    (video2dataset: {key}.mp4, {key}.json, {key}.txt)."""
    path = out / f"foreign_{width}x{height}.tar"
    if path.is_file():
        return str(path)
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for number, name in enumerate(SAMPLE_FILES):
            frames = [
                resize_frame(rgb, height, width) for _, rgb in iter_frames(str(sample_footage_dir() / name))
            ]
            sink.write(
                {
                    "__key__": f"{number:09d}",
                    "mp4": encode_mp4(np.stack(frames), fps=25.0),
                    "json": json.dumps({"url": name, "status": "success"}).encode(),
                    "txt": name.encode(),
                }
            )
    return str(path)


def foreign_rates(batches: int, batch_size: int, repeats: int) -> None:
    """Clips/s of 16 frames at 10 fps, 64x64, read from whole videos of another tool's shards
    (decode, window, resize in the loop) against the same videos after `prepare shards`."""
    out = Path(__file__).parent / "out" / "foreign"
    spec = ClipSpec(16, size=64, fps=10.0)
    for width, height in ((256, 256), (640, 360)):
        shard = foreign_shard(width, height, out)
        prepared = out / f"prepared_{width}x{height}"
        if not (prepared / "dataset.json").is_file():
            prepare_shards(
                [shard], prepared, ClipSettings(16, 64, 10.0, hop=4), val_fraction=0.0, clips_per_shard=64
            )
        rates = {}
        for name, urls, clip_spec in (
            ("foreign", [shard], spec),
            ("prepared", shard_paths(prepared, "train"), ClipSpec(16)),
        ):
            rates[name] = max(
                loader_rate(urls, clip_spec, batch_size, batches, workers=1)[0] for _ in range(repeats)
            )
        print(
            f"| {width}x{height} | {rates['foreign']:.1f} clips/s | {rates['prepared']:.1f} clips/s "
            f"| {rates['prepared'] / rates['foreign']:.1f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="clip height and width")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--foreign", action="store_true", help="other tools' shards against prepared ones")
    args = parser.parse_args()
    if args.foreign:
        print(
            "| videos | from their shards (1 worker) | after prepare shards (1 worker) | prepared / theirs |"
        )
        print("|---|---|---|---|")
        foreign_rates(args.batches, args.batch_size, args.repeats)
        return
    root = Path(__file__).parent / "out" / f"sample_{args.size}px"
    if not (root / "dataset.json").is_file():  # the sample footage, at the size asked for
        footage = sample_footage_dir()
        settings = ClipSettings(SAMPLE_SETTINGS.frames, args.size, SAMPLE_SETTINGS.fps, SAMPLE_SETTINGS.hop)
        prepare_videos([footage / name for name in SAMPLE_FILES], footage, root, settings, clips_per_shard=32)
    index = read_index(root)
    urls = shard_paths(root, "train")
    frames = index["frames_per_clip"]
    clips = args.batches * args.batch_size
    print(
        f"{index['splits']['train']['clips']} clips of {frames}x{index['height']}x{index['width']}, "
        f"{clips} clips per measurement, best of {args.repeats}"
    )
    raw = max(raw_decode_rate(urls, frames, clips) for _ in range(args.repeats))
    print(f"| raw decord decode, 1 process | {raw:7.1f} clips/s | 1.00x |")
    share = min(checksum_share(urls, frames, clips) for _ in range(args.repeats))
    print(f"checksum verification: {share:.2%} of decode time")
    rates = {}
    for workers in (0, 1, 2):
        runs = [
            loader_rate(urls, ClipSpec(frames), args.batch_size, args.batches, workers)
            for _ in range(args.repeats)
        ]
        rate, startup = max(runs)
        rates[workers] = rate
        per_worker = rate / max(1, workers)
        print(
            f"| loader, {workers} workers | {rate:7.1f} clips/s | {per_worker / raw:.2f}x raw per worker "
            f"| first batch after {startup:.2f} s |"
        )
    print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
