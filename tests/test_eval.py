import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.training_helpers import ROOT
from worldmodel.eval.report import EvalError, evaluate
from worldmodel.eval.rollout import RolloutSettings, load_world_model
from worldmodel.training.checkpoint import CheckpointError
from worldmodel.training.run import run, to_train_config

WORLDMODEL = Path(sys.executable).with_name("worldmodel")


def train_in_process(run_dir: Path, data: Path, *overrides: str) -> Path:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        composed = compose(
            "train",
            overrides=[
                f"run_dir={run_dir}",
                f"data.root={data}",
                "logger=csv",
                "data.frames=8",
                "data.global_batch_size=2",
                "data.num_workers=0",
                "trainer.max_steps=2",
                "trainer.checkpoint_every_n_steps=2",
                "trainer.video_every_n_steps=0",
                *overrides,
            ],
        )
    run(to_train_config(composed))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def atari_world_model(tmp_path_factory, atari_dir) -> tuple[Path, Path]:
    """A (barely) trained tokenizer and action-conditioned dynamics model on real game play."""
    root = tmp_path_factory.mktemp("world_model")
    tokenizer = train_in_process(root / "tokenizer", atari_dir, "task=tokenizer", "model=tokenizer_debug")
    dynamics = train_in_process(
        root / "dynamics",
        atari_dir,
        "task=dynamics",
        "model=dynamics_debug",
        f"task.tokenizer_checkpoint={tokenizer}",
    )
    return tokenizer, dynamics


def test_held_out_clips_are_spread_over_the_whole_val_split(atari_dir):
    from worldmodel.data.pipeline import ClipSpec, ClipStream
    from worldmodel.data.shards import read_index, shard_paths
    from worldmodel.eval.report import held_out_batches

    index = read_index(atari_dir)
    stream = ClipStream(shard_paths(atari_dir, "val"), ClipSpec(8), 1, train=False)
    every = [key for batch in stream for key in batch["key"]]
    assert len(every) >= 4
    batches = list(held_out_batches(atari_dir, index, frames=8, clips=2, batch_size=2))
    assert [len(b["key"]) for b in batches] == [2] and batches[0]["video"].shape[:2] == (2, 8)
    assert batches[0]["key"] == [every[0], every[-1]]  # the first and the last, not the first two


@pytest.mark.slow
def test_eval_end_to_end_writes_every_output(atari_world_model, atari_dir, tmp_path):
    import torch

    from worldmodel.eval.i3d import InceptionI3d
    from worldmodel.eval.lpips import LPIPS

    tokenizer, dynamics = atari_world_model
    # Weight files in the layouts users supply (random values: the pipeline is under test here).
    torch.save(InceptionI3d().state_dict(), tmp_path / "i3d.pt")
    lpips_state = {k: v for k, v in LPIPS().state_dict().items() if k.startswith("features.")}
    lpips_state |= {f"lin{i}": torch.rand(c) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lpips_state, tmp_path / "lpips.pt")
    command = [
        str(WORLDMODEL),
        "eval",
        str(dynamics),
        str(dynamics),
        str(tokenizer),
        "--data",
        str(atari_dir),
    ]
    command += ["--context", "2", "--horizon", "4", "--clips", "3", "--steps", "2", "--out", str(tmp_path)]
    command += [
        "--i3d",
        str(tmp_path / "i3d.pt"),
        "--lpips",
        str(tmp_path / "lpips.pt"),
        "--wandb",
        "offline",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for run_dir in ("0_dynamics", "1_dynamics"):
        report = json.loads((tmp_path / run_dir / "metrics.json").read_text())
        assert report["clips"] == 3 and report["horizon"] == 4
        for name in (
            "model_psnr",
            "model_ssim",
            "copy_last_psnr",
            "copy_last_ssim",
            "tokenizer_psnr",
            "model_lpips",
            "copy_last_lpips",
            "random_action_psnr",
            "delta_t_psnr",
        ):
            assert len(report["per_step"][name]) == 4, name
        assert set(report["at_horizon"]) == {"1", "4"}
        assert report["fvd"] == {"skipped": "clips of 6 frames; I3D needs at least 9"}
        assert (tmp_path / run_dir / "metrics.png").stat().st_size > 10_000
        assert (tmp_path / run_dir / "rollouts.mp4").stat().st_size > 1_000
        assert (tmp_path / run_dir / "rollouts.png").stat().st_size > 1_000
        assert (tmp_path / run_dir / "controllability.png").stat().st_size > 1_000
        assert set(report["by_source"]) == {"atari/Breakout"}  # conftest's game, reported on its own
        assert report["by_source"]["atari/Breakout"]["clips"] == 3
    reconstruction = json.loads((tmp_path / "2_tokenizer" / "metrics.json").read_text())
    assert reconstruction["stage"] == "tokenizer" and reconstruction["clips"] == 3
    assert (
        len(reconstruction["per_frame"]["tokenizer_psnr"]) == 6
        and reconstruction["mean"]["tokenizer_ssim"] > 0
    )
    assert (tmp_path / "2_tokenizer" / "reconstructions.mp4").stat().st_size > 1_000
    assert (tmp_path / "2_tokenizer" / "reconstructions.png").stat().st_size > 1_000
    table = (tmp_path / "comparison.md").read_text()
    assert "model_psnr" in table and len(table.splitlines()) == 5  # header, rule, 3 checkpoints
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb")) and list(offline.rglob("*.png")) and list(offline.rglob("*.mp4"))


@pytest.mark.slow
def test_eval_refuses_bad_inputs_with_clear_errors(atari_world_model, atari_dir, sample_dir, tmp_path):
    tokenizer, dynamics = atari_world_model
    settings = RolloutSettings(context=2, horizon=4, maskgit_steps=2)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        evaluate([str(tmp_path / "missing.ckpt")], str(atari_dir), settings, 2, str(tmp_path))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(dynamics.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        evaluate([str(corrupt)], str(atari_dir), settings, 2, str(tmp_path))
    with pytest.raises(CheckpointError, match="a tokenizer checkpoint; this needs a dynamics checkpoint"):
        load_world_model(tokenizer)  # what `worldmodel generate` needs
    with pytest.raises(EvalError, match="64x64 clips; the model was trained on 32x32"):
        evaluate([str(dynamics)], str(sample_dir), settings, 2, str(tmp_path))
    with pytest.raises(EvalError, match="lower --horizon"):
        evaluate([str(dynamics)], str(atari_dir), RolloutSettings(context=2, horizon=12), 2, str(tmp_path))


@pytest.mark.slow
def test_generate_continues_a_real_video_under_given_actions(atari_world_model, atari_dir, tmp_path):
    import av
    import webdataset as wds

    from worldmodel.data.shards import shard_paths
    from worldmodel.data.video import decode_mp4

    _, dynamics = atari_world_model
    sample = next(iter(wds.WebDataset(shard_paths(atari_dir, "val"), shardshuffle=False)))
    context = tmp_path / "context.mp4"
    context.write_bytes(sample["mp4"])
    out = tmp_path / "rollout.mp4"
    result = subprocess.run(
        [
            str(WORLDMODEL),
            "generate",
            str(dynamics),
            "--context",
            str(context),
            "--context-frames",
            "3",
            "--actions",
            "1,3",
            "--frames",
            "5",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 8  # 3 real + 5 generated
    real = decode_mp4(sample["mp4"], range(3), 8)
    assert (decode_mp4(out.read_bytes(), range(3), 8).astype(int) - real).__abs__().mean() < 3  # context kept
    bad = subprocess.run(
        [
            str(WORLDMODEL),
            "generate",
            str(dynamics),
            "--context",
            str(context),
            "--actions",
            "99",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--actions must be ids in [0, 18)" in bad.stderr


def test_loads_use_the_ema_weights_where_training_kept_them(tokenizer_checkpoint, tmp_path):
    import torch

    from worldmodel.training.checkpoint import load_tokenizer, net_state_dict, read_checkpoint

    checkpoint = read_checkpoint(tokenizer_checkpoint)
    raw = net_state_dict(checkpoint, "raw")
    checkpoint["ema"] = {name: value.float() + 1 for name, value in raw.items() if value.is_floating_point()}
    path = tmp_path / "with_ema.ckpt"
    torch.save(checkpoint, path)
    for name, value in load_tokenizer(path).state_dict().items():
        assert torch.equal(value, checkpoint["ema"].get(name, raw[name])), name
    for name, value in load_tokenizer(path, "raw").state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_eval_samples_clips_at_the_stride_the_model_was_trained_on(atari_dir):
    from worldmodel.data.shards import read_index
    from worldmodel.eval.report import held_out_batches, trained_stride

    index = read_index(atari_dir)
    assert trained_stride({"stride": 2}, index) == 2
    assert trained_stride({"fps": index["fps"] / 2, "stride": 1}, index) == 2  # the rate decides
    assert trained_stride({}, index) == 1  # checkpoints that recorded neither
    dense = next(held_out_batches(atari_dir, index, frames=8, clips=1, batch_size=1))
    sparse = next(held_out_batches(atari_dir, index, frames=4, clips=1, batch_size=1, stride=2))
    assert (sparse["video"] == dense["video"][:, ::2]).all()
    assert (sparse["actions"] == dense["actions"][:, ::2]).all()
