"""Writing shards: WebDataset tars of clips plus a `dataset.json` index.

A sample is `{__key__, mp4: h264 clip, json: metadata, actions.npy: int64 per frame}`
(`actions.npy` only where the source has actions). The json holds a checksum of every other
member (`checksums`), which the loader verifies: h264 conceals damaged bytes, so a corrupted
clip would otherwise decode into wrong frames without an error. Shards are `{split}-%06d.tar`.
The index is written last and atomically, so a folder without `dataset.json` is an unfinished
prepare.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

INDEX_NAME = "dataset.json"
INDEX_FORMAT = "worldmodel-shards/1"
TOKENS_FORMAT = "worldmodel-tokens/1"  # a folder of token shards (worldmodel/data/tokens.py)
SPLITS = ("train", "val")


@dataclass
class Clip:
    """One clip ready to be written: encoded video, its metadata and optional actions."""

    key: str
    mp4: bytes
    meta: dict
    actions: np.ndarray | None = None


@dataclass
class DatasetInfo:
    """What every clip of a prepared dataset shares; stored in `dataset.json`."""

    frames_per_clip: int
    height: int
    width: int
    fps: float
    num_actions: int | None
    source: dict = field(default_factory=dict)


def safe_key(text: str) -> str:
    """A WebDataset key: the part of a member name before the first dot, so no dots or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


class ShardSetWriter:
    """Writes clips of each split into `{split}-%06d.tar` and the index when closed."""

    def __init__(self, out_dir: str | os.PathLike, info: DatasetInfo, clips_per_shard: int = 256):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / INDEX_NAME).unlink(missing_ok=True)
        self.info = info
        self.clips_per_shard = clips_per_shard
        self._writers: dict[str, wds.ShardWriter] = {}
        self._clips_per_file: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
        self._keys: set[str] = set()

    def write(self, split: str, clip: Clip) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if clip.key in self._keys:
            raise ValueError(
                f"duplicate sample key {clip.key!r} (from {clip.meta.get('source')}): two sources map to one "
                "key after replacing characters other than letters, digits, - and _; rename one"
            )
        self._keys.add(clip.key)
        writer = self._writers.get(split)
        if writer is None:
            pattern = str(self.out_dir / f"{split}-%06d.tar")
            writer = self._writers[split] = wds.ShardWriter(
                pattern, maxcount=self.clips_per_shard, maxsize=1e12, verbose=0, mtime=0
            )
        payload = {"mp4": clip.mp4}
        if clip.actions is not None:
            payload["actions.npy"] = npy_bytes(np.asarray(clip.actions, dtype=np.int64))
        meta = {**clip.meta, "checksums": {member: checksum(data) for member, data in payload.items()}}
        writer.write({"__key__": clip.key, **payload, "json": meta})
        name = Path(writer.fname).name
        counts = self._clips_per_file[split]
        counts[name] = counts.get(name, 0) + 1

    def close(self) -> dict:
        """Finish every shard and write `dataset.json`; returns the index."""
        for writer in self._writers.values():
            writer.close()
        index = {"format": INDEX_FORMAT, **asdict(self.info), "splits": {}}
        for split in SPLITS:
            shards = [
                {"name": name, "clips": count, **file_digest(self.out_dir / name)}
                for name, count in sorted(self._clips_per_file[split].items())
            ]
            index["splits"][split] = {"clips": sum(s["clips"] for s in shards), "shards": shards}
        write_json_atomic(self.out_dir / INDEX_NAME, index)
        return index

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for writer in self._writers.values():
                writer.close()


def checksum(data: bytes) -> str:
    """A sample member's checksum as stored in its json: CRC-32, cheap next to decoding, and
    certain to change with damage to a few bytes."""
    return f"crc32:{zlib.crc32(data):08x}"


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array: what the shard stores, so its checksum covers those bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def file_digest(path: Path) -> dict:
    """A shard's size and sha256, as `dataset.json` records them (and `worldmodel verify` checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def read_index(folder: str | os.PathLike) -> dict:
    """Load and check a dataset folder's `dataset.json`."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: point the data config at a folder made by `worldmodel prepare`"
            " (or give shard URLs instead)"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run `worldmodel prepare`") from error
    if index.get("format") not in (INDEX_FORMAT, TOKENS_FORMAT):
        raise ValueError(
            f"{path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r} or {TOKENS_FORMAT!r}"
        )
    return index


def shard_paths(folder: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of one split's shards, in index order."""
    index = read_index(folder)
    if split not in index["splits"]:
        raise KeyError(f"{Path(folder) / INDEX_NAME} has no split {split!r}")
    return [str(Path(folder) / shard["name"]) for shard in index["splits"][split]["shards"]]
