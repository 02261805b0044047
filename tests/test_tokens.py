"""Token shards: `worldmodel tokenize` and training the dynamics stage from them (data=tokens)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.training_helpers import ROOT, left_in_group, logged, preempted_and_resumed, train
from worldmodel.config import ConfigError, DataConfig
from worldmodel.data.datamodule import VideoDataModule
from worldmodel.data.pipeline import ClipSpec, decode_sample
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.tokens import tokenize
from worldmodel.data.verify import verify_folder
from worldmodel.training.checkpoint import load_tokenizer

FRAMES = 4  # the windows: 4 frames at stride 1, as the dynamics runs below read them


@pytest.fixture(scope="module")
def atari_tokens(tmp_path_factory, atari_dir, trained_tokenizer) -> Path:
    """Game play with actions, every window encoded (as a run from video would draw them)."""
    out = tmp_path_factory.mktemp("atari_tokens")
    tokenize(trained_tokenizer, atari_dir, out, frames=FRAMES, stride=1, batch_size=3)
    return out


@pytest.fixture(scope="module")
def sample_tokens(tmp_path_factory, sample_dir, trained_tokenizer) -> Path:
    """Real footage, every 4th window encoded."""
    out = tmp_path_factory.mktemp("sample_tokens")
    tokenize(trained_tokenizer, sample_dir, out, frames=FRAMES, hop=4)
    return out


def dynamics(tokenizer: Path | None, *more: str) -> tuple[str, ...]:
    """A few steps of dynamics_debug on 4-frame windows, from video or (with data=tokens) tokens."""
    given = (f"task.tokenizer_checkpoint={tokenizer}",) if tokenizer else ()
    return (
        "task=dynamics",
        "model=dynamics_debug",
        *given,
        "trainer.checkpoint_every_n_steps=0",
        "data.num_workers=1",
        *more,
    )


def perturbed_copy(checkpoint_path: Path, out: Path) -> Path:
    """The checkpoint with one weight moved by 1e-3: the same architecture, another network."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    name = next(key for key in checkpoint["state_dict"] if key.endswith(".weight"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3
    checkpoint.pop("ema", None)
    torch.save(checkpoint, out)
    return out


@pytest.mark.parametrize("data, hop", [("atari", 1), ("sample", 4)])
def test_tokenize_writes_the_tokenizers_encode_of_every_window_of_every_clip(
    request, data, hop, trained_tokenizer
):
    video_dir = request.getfixturevalue(f"{data}_dir")
    token_dir = request.getfixturevalue(f"{data}_tokens")
    tokenizer = load_tokenizer(trained_tokenizer)
    index, video_index = read_index(token_dir), read_index(video_dir)
    assert index["window"] == {"frames": FRAMES, "stride": 1, "hop": hop} and index["dtype"] == "uint16"
    assert index["tokenizer"]["identity"].startswith("sha256:")
    assert index["num_actions"] == video_index["num_actions"]
    for split in ("train", "val"):
        assert index["splits"][split]["clips"] == video_index["splits"][split]["clips"]
        videos = wds.WebDataset(shard_paths(video_dir, split), shardshuffle=False)
        tokens = wds.WebDataset(shard_paths(token_dir, split), shardshuffle=False)
        for video_sample, token_sample in zip(videos, tokens, strict=True):
            assert token_sample["__key__"] == video_sample["__key__"]
            meta = json.loads(token_sample["json"])
            video = decode_sample(video_sample, ClipSpec(meta["frames"]), rng=None)["video"]
            starts = range(0, meta["frames"] - FRAMES + 1, hop)
            windows = np.stack([video[start : start + FRAMES] for start in starts])  # (starts, T, H, W, 3)
            stored = np.load(io.BytesIO(token_sample["tokens.npy"]))
            assert stored.dtype == np.uint16
            expected = tokenizer.encode(torch.from_numpy(windows))
            assert torch.equal(torch.from_numpy(stored.astype(np.int64)), expected)
            assert token_sample.get("actions.npy") == video_sample.get("actions.npy")
    assert verify_folder(token_dir) == ([], sum(s["clips"] for s in index["splits"].values()))


def test_a_dynamics_run_from_tokens_has_the_losses_of_one_from_video(
    tmp_path, atari_dir, atari_tokens, trained_tokenizer
):
    steps = ("trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.video_every_n_steps=2")
    from_video = train(tmp_path / "video", *dynamics(trained_tokenizer, *steps), sample_dir=atari_dir)
    # No task.tokenizer_checkpoint: the token folder names its tokenizer.
    from_tokens = train(
        tmp_path / "tokens",
        *dynamics(None, *steps),
        "data=tokens",
        f"data.frames={FRAMES}",
        sample_dir=atari_tokens,
    )
    assert from_video.returncode == 0, from_video.stderr[-3000:]
    assert from_tokens.returncode == 0, from_tokens.stderr[-3000:]
    for key in ("train/loss", "val/loss"):
        expected = logged(tmp_path / "video", key)
        assert expected and logged(tmp_path / "tokens", key) == expected, key
    # The checkpoint carries the tokenizer for decoding, as one trained from video does.
    saved = torch.load(
        tmp_path / "tokens" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["tokenizer"]["config"] == read_index(atari_tokens)["tokenizer"]["config"]
    assert (saved["data"]["height"], saved["data"]["width"]) == (32, 32)
    assert sorted(p.name for p in (tmp_path / "tokens" / "media").iterdir())  # previews decode tokens


def test_training_from_tokens_resumes_exactly(tmp_path, atari_tokens):
    overrides = dynamics(None, "data=tokens", f"data.frames={FRAMES}", "trainer.max_steps=16")
    stopped_at, expected, after = preempted_and_resumed(
        tmp_path / "full", tmp_path / "cut", *overrides, sample_dir=atari_tokens
    )
    assert stopped_at < 16 and sorted(after) == list(range(stopped_at, 16))
    assert [after[step] for step in after] == [expected[step] for step in after]


def test_tokens_of_another_tokenizer_are_refused_at_startup_naming_both(
    tmp_path, atari_tokens, trained_tokenizer
):
    other = perturbed_copy(trained_tokenizer, tmp_path / "other.ckpt")
    refused = train(
        tmp_path / "run",
        *dynamics(other, "data=tokens", f"data.frames={FRAMES}", "trainer.max_steps=2"),
        sample_dir=atari_tokens,
    )
    assert refused.returncode != 0
    message = refused.stderr
    assert "task.tokenizer_checkpoint" in message and str(other) in message, message[-2000:]
    assert str(trained_tokenizer.resolve()) in message, message[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_reading_other_windows_than_the_tokens_hold_fails_at_startup(atari_tokens):
    with pytest.raises(ConfigError, match=r"data.frames: .* windows of 4 frames .* data.frames=4"):
        VideoDataModule(DataConfig(root=str(atari_tokens), frames=6))


def test_damaged_token_samples_are_skipped_and_counted(tmp_path, atari_tokens):
    """Every shard copied; one sample's tokens damaged (its checksum no longer matches)."""
    copy = tmp_path / "tokens"
    copy.mkdir()
    for path in atari_tokens.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    first = shard_paths(copy, "val")[0]
    samples = list(wds.WebDataset(first, shardshuffle=False))
    damaged = bytearray(samples[0]["tokens.npy"])
    damaged[-1] ^= 0xFF
    with wds.TarWriter(first) as sink:
        for number, sample in enumerate(samples):
            members = {
                key: value for key, value in sample.items() if not key.startswith("__") or key == "__key__"
            }
            sink.write({**members, "tokens.npy": bytes(damaged)} if number == 0 else members)
    data = VideoDataModule(
        DataConfig(root=str(copy), frames=FRAMES, global_batch_size=1, num_workers=0, max_skip_fraction=0.9)
    )
    loader = data.val_dataloader()
    batches = list(loader)
    assert loader.skip_counts()["corrupt"] == 1
    assert sum(len(batch["tokens"]) for batch in batches) == read_index(copy)["splits"]["val"]["clips"] - 1
    assert batches[0]["tokens"].shape[1:] == (FRAMES, 8, 8) and "video" not in batches[0]


def test_tokenize_continues_only_what_it_was_started_with(tmp_path, atari_dir, trained_tokenizer):
    out = tmp_path / "tokens"
    tokenize(trained_tokenizer, atari_dir, out, frames=FRAMES, hop=2)
    with pytest.raises(ValueError, match="another window"):
        tokenize(trained_tokenizer, atari_dir, out, frames=FRAMES, hop=1)
    first = next(iter(wds.WebDataset(shard_paths(out, "val"), shardshuffle=False)))
    tokens = np.load(io.BytesIO(first["tokens.npy"]))
    assert tokens.shape[0] == 3  # 8 stored frames, windows of 4 starting at 0, 2 and 4


@pytest.mark.slow
def test_tokenize_killed_midway_and_run_again_writes_the_same_shards(
    tmp_path, sample_dir, sample_tokens, trained_tokenizer
):
    def command(out: Path, devices: int) -> list[str]:
        return [
            str(Path(sys.executable).with_name("worldmodel")),
            *("tokenize", str(trained_tokenizer), "--data", str(sample_dir), "--out", str(out)),
            *("--frames", str(FRAMES), "--hop", "4", "--devices", str(devices)),
        ]

    cut = subprocess.Popen(
        command(tmp_path / "cut", devices=2), cwd=ROOT, stderr=subprocess.PIPE, start_new_session=True
    )
    first = tmp_path / "cut" / shard_paths(sample_dir, "train")[0].split("/")[-1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not first.exists():
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert not (tmp_path / "cut" / "dataset.json").exists()  # it really stopped midway
    assert left_in_group(cut.pid) == []  # its pool processes ended with it
    again = subprocess.run(command(tmp_path / "cut", devices=1), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    # The shards of an uninterrupted run of the same settings, every sha256 included, whatever
    # the number of processes.
    assert read_index(tmp_path / "cut")["splits"] == read_index(sample_tokens)["splits"]


def test_inspect_shows_tokens_and_eval_asks_for_the_video_folder(atari_tokens, atari_dir, trained_tokenizer):
    worldmodel = str(Path(sys.executable).with_name("worldmodel"))
    inspect = [worldmodel, "inspect", str(atari_tokens), "--frames", str(FRAMES), "--batches", "1"]
    inspected = subprocess.run([*inspect, "--batch-size", "2"], capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert f"batch 0: tokens (2, {FRAMES}, 8, 8) torch.int64" in inspected.stdout
    evaluate = [worldmodel, "eval", str(trained_tokenizer), "--data", str(atari_tokens), "--clips", "1"]
    refused = subprocess.run(evaluate, capture_output=True, text=True)
    assert refused.returncode == 2 and f"evaluate on the video folder {atari_dir}" in refused.stderr


@pytest.fixture(scope="module")
def atari_latent_tokens(tmp_path_factory, atari_dir, trained_tokenizer, lam_checkpoint) -> Path:
    """Game play tokenized with a latent action model labelling every window."""
    out = tmp_path_factory.mktemp("atari_latent_tokens")
    tokenize(
        trained_tokenizer,
        atari_dir,
        out,
        frames=FRAMES,
        stride=1,
        batch_size=3,
        lam_checkpoint=lam_checkpoint,
    )
    return out


def test_tokenize_with_a_lam_stores_its_latent_actions_of_every_window(
    atari_dir, atari_latent_tokens, lam_checkpoint
):
    from worldmodel.models.lam import latent_conditioning
    from worldmodel.training.checkpoint import load_lam

    lam = load_lam(lam_checkpoint)
    index = read_index(atari_latent_tokens)
    assert index["lam"]["num_latents"] == lam.num_latents and index["lam"]["identity"].startswith("sha256:")
    videos = wds.WebDataset(shard_paths(atari_dir, "train"), shardshuffle=False)
    tokens = wds.WebDataset(shard_paths(atari_latent_tokens, "train"), shardshuffle=False)
    for video_sample, token_sample in zip(videos, tokens, strict=True):
        meta = json.loads(token_sample["json"])
        video = decode_sample(video_sample, ClipSpec(meta["frames"]), rng=None)["video"]
        windows = np.stack([video[start : start + FRAMES] for start in range(meta["frames"] - FRAMES + 1)])
        stored = np.load(io.BytesIO(token_sample["latent_actions.npy"]))  # (starts, frames)
        expected = latent_conditioning(lam, torch.from_numpy(windows))  # ids, then null
        assert torch.equal(torch.from_numpy(stored.astype(np.int64)), expected)
        assert (stored[:, -1] == -1).all() and "latent_actions.npy" in meta["checksums"]


def test_a_latent_action_run_from_tokens_has_the_losses_of_one_from_video(
    tmp_path, atari_dir, atari_latent_tokens, trained_tokenizer, lam_checkpoint
):
    latent = ("task.action_source=latent", f"task.lam_checkpoint={lam_checkpoint}", "trainer.max_steps=3")
    from_video = train(tmp_path / "video", *dynamics(trained_tokenizer, *latent), sample_dir=atari_dir)
    from_tokens = train(
        tmp_path / "tokens",
        *dynamics(None, *latent, "data=tokens", f"data.frames={FRAMES}"),
        sample_dir=atari_latent_tokens,
    )
    assert from_video.returncode == 0, from_video.stderr[-3000:]
    assert from_tokens.returncode == 0, from_tokens.stderr[-3000:]
    expected = logged(tmp_path / "video", "train/loss")
    assert len(expected) == 3 and logged(tmp_path / "tokens", "train/loss") == expected
    saved = torch.load(
        tmp_path / "tokens" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert "lam" in saved  # eval conditions the rollouts with it, as for a run from video


def test_latent_action_runs_need_tokens_labelled_by_their_lam(
    tmp_path, atari_tokens, atari_latent_tokens, lam_checkpoint
):
    from worldmodel.data.tokens import lam_for_tokens

    refused = train(
        tmp_path / "run",
        *dynamics(None, "data=tokens", f"data.frames={FRAMES}", "trainer.max_steps=2"),
        "task.action_source=latent",
        f"task.lam_checkpoint={lam_checkpoint}",
        sample_dir=atari_tokens,  # tokenized without --lam
    )
    assert refused.returncode != 0 and f"--lam {lam_checkpoint}" in refused.stderr, refused.stderr[-2000:]
    other = perturbed_copy(lam_checkpoint, tmp_path / "other_lam.ckpt")
    with pytest.raises(ConfigError, match=r"task\.lam_checkpoint: .*other_lam\.ckpt.* is not the lam"):
        lam_for_tokens(read_index(atari_latent_tokens), str(atari_latent_tokens), str(other))
