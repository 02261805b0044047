"""`worldmodel prepare shards`: convert WebDataset shards made by other tools (whole videos of
any length, size and rate, e.g. video2dataset's) into prepared ones, once, when decoding the
originals in the training loop is too slow (`benchmarks/data_throughput.py --foreign`)."""

from __future__ import annotations

import os
from pathlib import Path

import webdataset as wds

from worldmodel.data.foreign import caption, own_json, video_member
from worldmodel.data.sources.folder import ClipSettings, shard_videos


def foreign_videos(urls: list[str], caption_field: str | None, extra_member: str | None) -> tuple[list, list]:
    """(videos, problems): each sample's (name, video bytes, caption, url) in shard order,
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
        videos.append((name, sample[member], caption(sample, meta, caption_field), meta.get("url")))
    return videos, problems


def prepare_shards(
    urls: list[str],
    out: str | os.PathLike,
    settings: ClipSettings,
    val_fraction: float = 0.1,
    clips_per_shard: int = 256,
    workers: int = 1,
    caption_field: str | None = None,
    video_member_name: str | None = None,
    split_by: str = "file",
) -> dict:
    """Cut every video of the shards at `urls` into clips, as `prepare folder` cuts files; the
    split is by video (a hash of shard and key) or by time within each. Returns the dataset index."""
    videos, problems = foreign_videos(urls, caption_field, video_member_name)
    # The caption and where the video came from travel with each of its clips.
    jobs = [(data, name, settings, {"caption": text, "url": url}) for name, data, text, url in videos]
    names = [name for name, *_ in videos]
    source = {"kind": "shards", "urls": list(urls)}
    return shard_videos(
        jobs, names, out, settings, source, val_fraction, clips_per_shard, workers, problems, split_by
    )
