"""Clips/s through the full loader (shards -> decode -> sample -> batch) against raw decord
decode of the same clips, in one run, for 0, 1 and 2 loader workers.

    python benchmarks/data_throughput.py [--size 64] [--batches 100]

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
import webdataset as wds

from worldmodel.data.pipeline import ClipLoader, ClipSpec, ClipStream, verify_checksums
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.sources.folder import ClipSettings, prepare_videos
from worldmodel.data.sources.sample import SAMPLE_FILES, SAMPLE_SETTINGS, sample_footage_dir


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
    urls: list[str], frames: int, batch_size: int, batches: int, workers: int
) -> tuple[float, float]:
    stream = ClipStream(urls, ClipSpec(frames), batch_size, train=True, batches_per_epoch=batches)
    started = time.perf_counter()
    iterator = iter(ClipLoader(stream, num_workers=workers))
    next(iterator)
    first = time.perf_counter()
    rest = sum(len(batch["key"]) for batch in iterator)
    return rest / (time.perf_counter() - first), first - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="clip height and width")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
            loader_rate(urls, frames, args.batch_size, args.batches, workers) for _ in range(args.repeats)
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
