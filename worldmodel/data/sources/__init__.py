"""Sources that turn raw material (video files, game play) into shards."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from worldmodel.data.processes import exit_with
from worldmodel.data.shards import Clip, DatasetInfo, ShardSetWriter, safe_key
from worldmodel.data.video import LOSSLESS, encode_mp4

# A job's work: its clips, or a reason why it has none (a failure that must not stop the others).
Work = Callable[[object], tuple[list[Clip], "str | None"]]


def check_val_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")


def validation_count(items: int, fraction: float) -> int:
    """How many of `items` go to validation: ceil(fraction * items), none when there is only one."""
    check_val_fraction(fraction)
    return math.ceil(fraction * items) if items > 1 else 0


def episode_clips(
    frames: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    frames_per_clip: int,
    fps: float,
    key_prefix: str,
    meta: dict,
) -> list[Clip]:
    """Cut one recorded episode (frames (L, H, W, 3) uint8, action t and reward t after frame t)
    into consecutive clips that never cross its end, encoded losslessly so that replaying the
    actions reproduces them; `meta` (the episode's own fields) goes into every clip's metadata."""
    clips = []
    for clip_index, start in enumerate(range(0, len(frames) - frames_per_clip + 1, frames_per_clip)):
        stop = start + frames_per_clip
        clip_meta = {
            **meta,
            "episode_steps": len(frames),
            "start_step": start,
            "clip_index": clip_index,
            "rewards": rewards[start:stop].tolist(),
            "fps": fps,
            "frames": frames_per_clip,
            "height": frames.shape[1],
            "width": frames.shape[2],
        }
        clips.append(
            Clip(
                key=safe_key(f"{key_prefix}_{clip_index:05d}"),
                mp4=encode_mp4(frames[start:stop], fps, LOSSLESS),
                meta=clip_meta,
                actions=actions[start:stop],
            )
        )
    return clips


def shard_in_parallel(
    work: Work,
    jobs: Sequence,
    splits: Sequence[str] | Callable[[int, Clip], str | None],
    out: str | os.PathLike,
    info: DatasetInfo,
    clips_per_shard: int,
    workers: int,
    unit: str,
) -> tuple[int, dict[int, str]]:
    """Run `work` over `jobs` in processes and write each job's clips, in job order, to its split:
    one per job, or chosen per clip by `splits(job number, clip)` (None: the clip is left out).

    Returns the number of clips written and the failure reason of each job that had none.
    """
    split_of = splits if callable(splits) else lambda number, clip: splits[number]
    failures: dict[int, str] = {}
    written = 0
    with (
        ShardSetWriter(out, info, clips_per_shard) as writer,
        # the workers end with this process even when it is killed outright
        ProcessPoolExecutor(max(1, workers), initializer=exit_with, initargs=(os.getpid(),)) as pool,
    ):
        progress = tqdm(pool.map(work, jobs), total=len(jobs), unit=unit, desc="prepare")
        for number, (clips, failure) in enumerate(progress):
            if failure:
                failures[number] = failure
            for clip in clips:
                split = split_of(number, clip)
                if split is not None:
                    writer.write(split, clip)
                    written += 1
            progress.set_postfix(clips=written, failed=len(failures))
    return written, failures
