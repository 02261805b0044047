"""`worldmodel prepare shards`: convert WebDataset shards made by other tools (whole videos of
any length, size and rate, e.g. video2dataset's) into prepared ones, once, when decoding the
originals in the training loop is too slow (`benchmarks/data_throughput.py --foreign`)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from worldmodel.data.foreign import caption, own_json, video_member
from worldmodel.data.shards import Clip, DatasetInfo, read_index, write_json_atomic
from worldmodel.data.sources import shard_in_parallel
from worldmodel.data.sources.folder import REPORT_NAME, ClipSettings, cut_clips, split_by_file


def foreign_videos(urls: list[str], caption_field: str | None, extra_member: str | None) -> tuple[list, list]:
    """(videos, problems): each sample's (name, video bytes, caption, its json) in shard order,
    and what could not be read (a tar error, a sample without a video member)."""
    videos, problems = [], []

    def on_error(error: Exception) -> bool:
        problems.append(f"{type(error).__name__}: {error}")
        return True

    for sample in wds.tarfile_to_samples(handler=on_error)({"url": url} for url in urls):
        name = f"{Path(sample['__url__']).name}/{sample['__key__']}"
        member = video_member(sample, extra_member)
        if member is None:
            problems.append(f"{name}: no video member")
            continue
        meta = own_json(sample)
        videos.append((name, sample[member], caption(sample, meta, caption_field), meta))
    return videos, problems


def _cut_or_report(job: tuple[str, bytes, str, dict, ClipSettings]) -> tuple[list[Clip], str | None]:
    name, data, text, meta, settings = job
    try:
        clips = cut_clips(io.BytesIO(data), name, settings)
    except Exception as error:  # any unreadable video is reported, never fatal to the job
        return [], f"{type(error).__name__}: {error}"
    if not clips:
        return [], f"shorter than one clip ({settings.frames} frames at {settings.fps} fps)"
    for clip in clips:  # the caption and where the video came from travel with each clip
        clip.meta.update(caption=text, url=meta.get("url"))
    return clips, None


def prepare_shards(
    urls: list[str],
    out: str | os.PathLike,
    settings: ClipSettings,
    val_fraction: float = 0.1,
    clips_per_shard: int = 256,
    workers: int = 1,
    caption_field: str | None = None,
    video_member_name: str | None = None,
) -> dict:
    """Cut every video of the shards at `urls` into clips, as `prepare folder` cuts files; the
    split is by video (a hash of shard and key). Returns the dataset index."""
    videos, problems = foreign_videos(urls, caption_field, video_member_name)
    names = [name for name, *_ in videos]
    split_of = split_by_file(names, val_fraction)
    info = DatasetInfo(
        frames_per_clip=settings.frames,
        height=settings.size,
        width=settings.size,
        fps=settings.fps,
        num_actions=None,
        source={"kind": "shards", "urls": list(urls)},
    )
    jobs = [(name, data, text, meta, settings) for name, data, text, meta in videos]
    splits = [split_of[name] for name in names]
    written, failed = shard_in_parallel(
        _cut_or_report, jobs, splits, out, info, clips_per_shard, workers, "video"
    )
    failures = {names[number]: reason for number, reason in failed.items()}
    report = {"videos": len(videos), "clips": written, "failed": failures, "unreadable": problems}
    write_json_atomic(Path(out) / REPORT_NAME, report)
    for line in [*problems, *(f"skipped {name}: {reason}" for name, reason in failures.items())]:
        tqdm.write(line, file=sys.stderr)
    if failures or problems:
        tqdm.write(f"{len(failures) + len(problems)} skipped; see {Path(out) / REPORT_NAME}", file=sys.stderr)
    return read_index(out)
