"""`worldmodel prepare folder`: cut every video under a folder into clips and shard them."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from worldmodel.data.shards import (
    Clip,
    DatasetInfo,
    read_index,
    safe_key,
    write_json_atomic,
)
from worldmodel.data.sources import check_val_fraction, shard_in_parallel, validation_count
from worldmodel.data.video import EncodeSettings, encode_mp4, iter_frames, resize_short_side_center_crop

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
REPORT_NAME = "prepare_report.json"


@dataclass(frozen=True)
class ClipSettings:
    """How source video becomes clips: length, rate, square size, hop between clip starts."""

    frames: int = 16
    size: int = 64
    fps: float = 10.0
    hop: int | None = None  # frames between clip starts; None = frames (no overlap)
    encode: EncodeSettings = EncodeSettings()

    def __post_init__(self) -> None:
        for name in ("frames", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.hop is not None and self.hop < 1:
            raise ValueError(f"hop must be >= 1, got {self.hop}")


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Every file under `root` with a video suffix, sorted for a deterministic order."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of videos")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def split_by_file(names: Sequence[str], val_fraction: float) -> dict[str, str]:
    """Assign each source file to train or val, deterministically, by a hash of its name.

    The files whose hashes sort first go to val: ceil(fraction * n) of them (at least one when
    the fraction is positive and there are two or more files), so clips of one source video
    never land on both sides.
    """
    ranked = sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    n_val = validation_count(len(ranked), val_fraction)
    return {name: ("val" if rank < n_val else "train") for rank, name in enumerate(ranked)}


def split_in_time(clip: Clip, val_fraction: float) -> str | None:
    """The last `val_fraction` of each video is val: a window wholly before the cut trains, one
    wholly after it validates, and one across it is left out, so that no frame is on both sides."""
    cut = round((1.0 - val_fraction) * clip.meta["source_frames"])
    start = clip.meta["start_frame"]
    if start + clip.meta["frames"] <= cut:
        return "train"
    return "val" if start >= cut else None


def cut_clips(path, name: str, settings: ClipSettings) -> list[Clip]:
    """Decode one video (a path, or a file object) at the target rate and size and encode
    consecutive windows as clips."""
    hop = settings.hop or settings.frames
    frames: list[np.ndarray] = []
    times: list[float] = []
    for time, rgb in iter_frames(path, settings.fps):
        frames.append(resize_short_side_center_crop(rgb, settings.size))
        times.append(time)
    clips = []
    for clip_index, start in enumerate(range(0, len(frames) - settings.frames + 1, hop)):
        window = np.stack(frames[start : start + settings.frames])  # (T, H, W, 3)
        meta = {
            "source": name,
            "clip_index": clip_index,
            "start_frame": start,
            "source_frames": len(frames),
            "start_time": round(times[start], 4),
            "fps": settings.fps,
            "frames": settings.frames,
            "height": settings.size,
            "width": settings.size,
        }
        key = safe_key(f"{name}_{clip_index:05d}")
        clips.append(Clip(key=key, mp4=encode_mp4(window, settings.fps, settings.encode), meta=meta))
    return clips


def _cut_or_report(job: tuple[str | bytes, str, ClipSettings, dict]) -> tuple[list[Clip], str | None]:
    """One video (a path, or its bytes) cut into clips whose json gets `extra`; or why it has none."""
    source, name, settings, extra = job
    try:
        clips = cut_clips(io.BytesIO(source) if isinstance(source, bytes) else source, name, settings)
    except Exception as error:  # any unreadable video is reported, never fatal to the job
        return [], f"{type(error).__name__}: {error}"
    if not clips:
        return [], f"shorter than one clip ({settings.frames} frames at {settings.fps} fps)"
    for clip in clips:
        clip.meta.update(extra)
    return clips, None


def prepare_videos(
    files: Sequence[Path],
    root: Path,
    out: str | os.PathLike,
    settings: ClipSettings,
    val_fraction: float = 0.1,
    clips_per_shard: int = 256,
    workers: int = 1,
    source_note: dict | None = None,
    split_by: str = "file",
) -> dict:
    """Shard the clips of `files` (named relative to `root`); returns the dataset index."""
    names = [str(path.relative_to(root)) for path in files]
    jobs = [(str(path), name, settings, {}) for path, name in zip(files, names, strict=True)]
    source = source_note or {"kind": "folder", "root": str(root)}
    return shard_videos(
        jobs, names, out, settings, source, val_fraction, clips_per_shard, workers, split_by=split_by
    )


def shard_videos(
    jobs: Sequence,
    names: Sequence[str],
    out: str | os.PathLike,
    settings: ClipSettings,
    source: dict,
    val_fraction: float,
    clips_per_shard: int,
    workers: int,
    unreadable: Sequence[str] = (),
    split_by: str = "file",
) -> dict:
    """Cut each job's video into clips in processes (`_cut_or_report`), split by video (`names`) or
    by time within each video (`split_by`), write the shards, `dataset.json` and the report of what
    was skipped; returns the index."""
    info = DatasetInfo(
        frames_per_clip=settings.frames,
        height=settings.size,
        width=settings.size,
        fps=settings.fps,
        num_actions=None,
        source={**source, "split_by": split_by, "val_fraction": val_fraction},
    )
    if split_by == "file":
        split_of = split_by_file(names, val_fraction)
        splits = [split_of[name] for name in names]
    elif split_by == "time":
        check_val_fraction(val_fraction)

        def splits(number: int, clip: Clip) -> str | None:
            return split_in_time(clip, val_fraction)

    else:
        raise ValueError(f"split_by must be 'file' or 'time', got {split_by!r}")
    written, failed = shard_in_parallel(
        _cut_or_report, jobs, splits, out, info, clips_per_shard, workers, "video"
    )
    failures = {names[number]: reason for number, reason in failed.items()}
    report = {"videos": len(jobs), "clips": written, "failed": failures, "unreadable": list(unreadable)}
    write_json_atomic(Path(out) / REPORT_NAME, report)
    for line in [*unreadable, *(f"skipped {name}: {reason}" for name, reason in failures.items())]:
        tqdm.write(line, file=sys.stderr)
    if failures or unreadable:
        skipped = len(failures) + len(unreadable)
        tqdm.write(f"{skipped} of {len(jobs)} videos skipped; see {Path(out) / REPORT_NAME}", file=sys.stderr)
    return read_index(out)


def prepare_folder(src: str | os.PathLike, out: str | os.PathLike, settings: ClipSettings, **kwargs) -> dict:
    """`worldmodel prepare folder SRC --out DIR`: every video under SRC, recursively."""
    root = Path(src).resolve()
    return prepare_videos(find_videos(root), root, out, settings, **kwargs)
