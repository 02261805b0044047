import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.test_video import psnr
from worldmodel.data.pipeline import ClipSpec, ClipStream
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.sources.folder import ClipSettings, prepare_folder, split_by_file
from worldmodel.data.sources.sample import SAMPLE_FILES, sample_footage_dir
from worldmodel.data.video import iter_frames, resize_short_side_center_crop


def read_all(urls, frames):
    """Every sample of the shards once, decoded from frame 0 (the validation path)."""
    stream = ClipStream(urls, ClipSpec(frames), batch_size=1, train=False)
    return [batch for batch in stream]


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    src = tmp_path_factory.mktemp("videos")
    (src / "calls").mkdir()
    shutil.copy(sample_footage_dir() / "carphone_pristine.mp4", src / "calls" / "carphone.mp4")
    shutil.copy(
        sample_footage_dir() / "carphone_pristine.mp4", src / "calls" / "again.mkv"
    )  # probed, not trusted by suffix
    shutil.copy(sample_footage_dir() / "bikes.mp4", src / "bikes.mov")
    (src / "broken.mp4").write_bytes(b"\x00" * 1000)
    (src / "notes.txt").write_text("not a video")
    out = tmp_path_factory.mktemp("folder_shards")
    settings = ClipSettings(frames=8, size=64, fps=10)
    index = prepare_folder(src, out, settings, val_fraction=0.25, clips_per_shard=4, workers=2)
    return src, out, settings, index


def test_clips_read_back_match_the_source_frames(folder_dataset):
    src, out, settings, _ = folder_dataset
    urls = shard_paths(out, "train") + shard_paths(out, "val")
    batches = read_all(urls, settings.frames)
    assert (
        len(batches)
        == read_index(out)["splits"]["train"]["clips"] + read_index(out)["splits"]["val"]["clips"]
    )
    references = {}
    for batch in batches:
        meta_source = batch["key"][0].rsplit("_", 1)[0]
        name = {"calls_carphone_mp4": "calls/carphone.mp4", "calls_again_mkv": "calls/again.mkv"}.get(
            meta_source, "bikes.mov"
        )
        if name not in references:
            references[name] = np.stack(
                [
                    resize_short_side_center_crop(rgb, settings.size)
                    for _, rgb in iter_frames(str(src / name), settings.fps)
                ]
            )
        clip_index = int(batch["key"][0].rsplit("_", 1)[1])
        start = clip_index * settings.frames
        truth = references[name][start : start + settings.frames]
        assert psnr(batch["video"][0].numpy(), truth) >= 35, batch["key"]


def test_unreadable_files_are_reported_and_do_not_stop_the_job(folder_dataset):
    _, out, _, index = folder_dataset
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["videos"] == 4  # notes.txt is not a video file
    assert list(report["failed"]) == ["broken.mp4"]
    assert index["splits"]["train"]["clips"] > 0


def test_index_describes_the_shards(folder_dataset):
    _, out, settings, index = folder_dataset
    assert (index["frames_per_clip"], index["height"], index["width"], index["fps"]) == (8, 64, 64, 10)
    assert index["num_actions"] is None
    for split in ("train", "val"):
        assert index["splits"][split]["clips"] == sum(s["clips"] for s in index["splits"][split]["shards"])
        for shard in index["splits"][split]["shards"]:
            assert shard["name"].startswith(f"{split}-") and shard["clips"] <= 4
            data = (out / shard["name"]).read_bytes()
            assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]


def test_split_is_by_source_file_and_deterministic(folder_dataset):
    _, out, settings, _ = folder_dataset
    sources = {}
    for split in ("train", "val"):
        sources[split] = {batch["key"][0].rsplit("_", 1)[0] for batch in read_all(shard_paths(out, split), 8)}
    assert sources["train"] and sources["val"] and not sources["train"] & sources["val"]
    names = [f"video{i}.mp4" for i in range(20)]
    assert split_by_file(names, 0.25) == split_by_file(list(reversed(names)), 0.25)
    assert sum(s == "val" for s in split_by_file(names, 0.25).values()) == 5


def clip_metadata(urls) -> list[dict]:
    return [json.loads(sample["json"]) for sample in wds.WebDataset(urls, shardshuffle=False)]


def test_sample_dataset_is_real_footage_split_in_time(sample_dir):
    """Every video trains on its first 70% and validates on its last 30%; no frame on both sides."""
    index = read_index(sample_dir)
    assert index["source"]["kind"] == "sample" and index["source"]["split_by"] == "time"
    assert index["splits"]["train"]["clips"] >= 60 and index["splits"]["val"]["clips"] >= 20
    train, val = (clip_metadata(shard_paths(sample_dir, split)) for split in ("train", "val"))
    assert {clip["source"] for clip in train} == {clip["source"] for clip in val} == set(SAMPLE_FILES)
    for name in SAMPLE_FILES:
        last_train_frame = max(c["start_frame"] + c["frames"] for c in train if c["source"] == name)
        first_val_frame = min(c["start_frame"] for c in val if c["source"] == name)
        video_frames = next(c["source_frames"] for c in val if c["source"] == name)
        assert last_train_frame <= round(0.7 * video_frames) <= first_val_frame, name
    first = read_all(shard_paths(sample_dir, "val"), 16)[0]
    assert first["video"].shape == (1, 16, 64, 64, 3)
    assert first["video"].float().std() > 20  # real images, not a blank frame


def test_missing_index_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_index(tmp_path)
    (tmp_path / "dataset.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_index(Path(tmp_path))
