"""Shards made by other tools: video2dataset's layout, read by the loader as they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.test_video import psnr
from tests.training_helpers import logged, train
from worldmodel.config import ConfigError, DataConfig
from worldmodel.data.datamodule import VideoDataModule
from worldmodel.data.foreign import window_indices
from worldmodel.data.pipeline import ClipLoader, ClipSpec, ClipStream, TooManyBadSamples
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.sources.sample import SAMPLE_FILES, sample_footage_dir
from worldmodel.data.verify import verify_folder
from worldmodel.data.video import iter_frames, resize_short_side_center_crop

SIZE, FRAMES, FPS = 32, 4, 5.0
CAPTIONS = {
    "bigbuckbunny.mp4": "a rabbit in a meadow",
    "bikes.mp4": "cyclists on a road",
    "carphone_pristine.mp4": "a man on the phone in a car",
}


@pytest.fixture(scope="module")
def video2dataset_shard(tmp_path_factory) -> str:
    """The sample videos (1280x720, 640x272 and 176x144; 25 and 29.97 fps; 120-250 frames) as
    video2dataset writes them: {key}.mp4 (the whole video), {key}.json (its fields), {key}.txt."""
    path = tmp_path_factory.mktemp("video2dataset") / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for number, name in enumerate(SAMPLE_FILES):
            key = f"{number:09d}"
            meta = {"url": f"https://example.com/{name}", "key": key, "status": "success", "caption": name}
            sink.write(
                {
                    "__key__": key,
                    "mp4": (sample_footage_dir() / name).read_bytes(),
                    "json": json.dumps({**meta, "duration": 5.0, "error_message": None}).encode(),
                    "txt": CAPTIONS[name].encode(),
                }
            )
    return str(path)


def foreign_config(shard: str, **more) -> DataConfig:
    settings = dict(frames=FRAMES, global_batch_size=2, num_workers=0, size=SIZE, fps=FPS)
    return DataConfig(root=None, train_shards=[shard], val_shards=[shard], **{**settings, **more})


def test_a_video2dataset_shard_trains_a_debug_tokenizer_through_train_shards(tmp_path, video2dataset_shard):
    shards = f"[{video2dataset_shard}]"
    run = train(
        tmp_path,
        "data.root=null",
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        f"data.size={SIZE}",
        f"data.fps={FPS}",
        "trainer.max_steps=3",
        "trainer.val_every_n_steps=3",
        sample_dir=Path("unused"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(logged(tmp_path, "train/loss")) == [0, 1, 2] and logged(tmp_path, "val/loss")


def test_batches_carry_square_clips_and_the_captions(video2dataset_shard):
    batches = list(VideoDataModule(foreign_config(video2dataset_shard)).val_dataloader())
    clips = {key: text for batch in batches for key, text in zip(batch["key"], batch["text"], strict=True)}
    assert clips == {f"{n:09d}": CAPTIONS[name] for n, name in enumerate(SAMPLE_FILES)}
    assert all(batch["video"].shape[1:] == (FRAMES, SIZE, SIZE, 3) for batch in batches)
    by_field = VideoDataModule(foreign_config(video2dataset_shard, caption_field="caption"))
    assert next(iter(by_field.val_dataloader()))["text"][0] == SAMPLE_FILES[0]  # the json's field


def test_windows_of_a_long_video_cover_it_over_an_epoch_and_validation_windows_never_change(
    video2dataset_shard,
):
    """bikes.mp4: 250 frames at 25 fps; a window of 4 frames at 5 fps spans 16 source frames."""
    frames = [
        resize_short_side_center_crop(frame, SIZE)
        for _, frame in iter_frames(str(sample_footage_dir() / "bikes.mp4"))
    ]  # every source frame, as the loader resizes them
    key = f"{SAMPLE_FILES.index('bikes.mp4'):09d}"

    def start_of(clip: np.ndarray) -> int:  # the source frame the window's first frame is
        errors = [np.abs(frame.astype(int) - clip[0].astype(int)).mean() for frame in frames]
        return int(np.argmin(errors))

    stream = ClipStream(
        [video2dataset_shard], ClipSpec(FRAMES, size=SIZE, fps=FPS), 1, train=True, batches_per_epoch=30
    )
    starts = [start_of(batch["video"][0].numpy()) for batch in ClipLoader(stream) if batch["key"][0] == key]
    assert len(starts) >= 5 and len(set(starts)) >= 4, starts
    assert min(starts) < 60 and max(starts) > 170, starts  # spread over the 234 possible starts
    validation = ClipStream([video2dataset_shard], ClipSpec(FRAMES, size=SIZE, fps=FPS), 1, train=False)
    first, again = ({batch["key"][0]: batch["video"] for batch in ClipLoader(validation)} for _ in range(2))
    assert all(np.array_equal(first[k], again[k]) for k in first) and start_of(first[key][0].numpy()) == 0


def test_window_frames_follow_the_asked_rate():
    spec = ClipSpec(4, size=SIZE, fps=5.0)
    assert window_indices(250, 25.0, spec, rng=None) == [0, 5, 10, 15]
    assert window_indices(120, 29.97, spec, rng=None) == [0, 6, 12, 18]
    assert window_indices(250, 25.0, ClipSpec(4, stride=2, size=SIZE), rng=None) == [0, 2, 4, 6]


def test_foreign_shards_without_data_size_fail_at_startup(video2dataset_shard):
    with pytest.raises(ConfigError, match=r"data.size: the samples of .*00000.tar are whole videos"):
        VideoDataModule(foreign_config(video2dataset_shard, size=None))


def test_short_unreadable_or_video_less_samples_are_skipped_and_all_bad_shards_stop(tmp_path):
    footage = (sample_footage_dir() / "carphone_pristine.mp4").read_bytes()
    samples = [
        {"__key__": "garbage", "mp4": b"\x00garbage" * 100, "txt": b"x"},
        {"__key__": "no_video", "json": b'{"url": "u"}', "txt": b"x"},
        {"__key__": "webm_named", "webm": footage},  # any container FFmpeg reads, whatever its name
    ]
    shard = str(tmp_path / "mixed.tar")
    with wds.TarWriter(shard) as sink:
        for sample in samples:
            sink.write(sample)
    stream = ClipStream([shard], ClipSpec(FRAMES, size=SIZE, fps=FPS), 1, train=False)
    loader = ClipLoader(stream, max_skip_fraction=0.9)
    assert [batch["key"][0] for batch in loader] == ["webm_named"]
    assert loader.skip_counts()["video"] == 1 and loader.skip_counts()["json"] == 1
    long_window = ClipStream([shard], ClipSpec(100, size=SIZE, fps=FPS), 1, train=True, batches_per_epoch=2)
    with pytest.raises(TooManyBadSamples, match="video"):  # every window too long: stops, no endless loop
        next(iter(ClipLoader(long_window, max_skip_fraction=0.01, min_samples_for_check=20)))


def test_prepare_shards_converts_them_and_the_clips_read_back_match_the_videos(tmp_path, video2dataset_shard):
    out = tmp_path / "prepared"
    command = [str(Path(sys.executable).with_name("worldmodel")), "prepare", "shards", video2dataset_shard]
    command += [
        "--out",
        str(out),
        "--frames",
        "8",
        "--size",
        "64",
        "--fps",
        "10",
        "--val-fraction",
        "0.34",
        "--split-by",
        "time",
        "--crf",
        "0",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    index = read_index(out)
    assert (index["frames_per_clip"], index["height"], index["fps"]) == (8, 64, 10.0)
    assert index["splits"]["val"]["clips"] and index["splits"]["train"]["clips"]
    assert index["source"]["split_by"] == "time"
    assert verify_folder(out)[0] == []  # checksums of every member, sha256 of every shard
    references = {}
    stream = ClipStream(shard_paths(out, "train") + shard_paths(out, "val"), ClipSpec(8), 1, train=False)
    for batch in stream:
        key = batch["key"][0]  # 00000_tar_<video key>_<clip index>
        number, clip_index = int(key.split("_")[2]), int(key.rsplit("_", 1)[1])
        name = SAMPLE_FILES[number]
        if name not in references:
            references[name] = np.stack(
                [
                    resize_short_side_center_crop(rgb, 64)
                    for _, rgb in iter_frames(str(sample_footage_dir() / name), 10)
                ]
            )
        truth = references[name][clip_index * 8 : clip_index * 8 + 8]
        assert psnr(batch["video"][0].numpy(), truth) >= 35, key  # the bound of `prepare folder`
        assert batch["text"] == [CAPTIONS[name]]  # captions kept end to end
    assert len(references) == 3


def test_inspect_reads_shards_of_other_tools(video2dataset_shard):
    worldmodel = str(Path(sys.executable).with_name("worldmodel"))
    command = [
        worldmodel,
        "inspect",
        video2dataset_shard,
        "--batches",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
    ]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2 and "data.size" in refused.stderr
    inspected = subprocess.run(
        [*command, "--size", "32", "--fps", "5", "--frames", "4"], capture_output=True, text=True
    )
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert (
        "batch 0: video (2, 4, 32, 32, 3) torch.uint8" in inspected.stdout
        and "captions [" in inspected.stdout
    )
