"""`worldmodel prepare coinrun`: record random-action CoinRun episodes with procgen.

The reference case for latent actions (Genie's CoinRun study, reproduced by Jafar and Jasmine):
64x64 frames of procgen's CoinRun played by a policy that draws one of its 15 actions uniformly at
every step. Episode e plays the level `episode_seed(e)` (one level per episode, `num_levels=1`),
so the recorded seed and actions replay its frames exactly; clips never cross an episode end and
the last episodes are held out, as in `prepare atari`.

procgen's wheels pin numpy<2 and gym<1, which worldmodel's environment cannot hold, so each
episode is played by `coinrun_player.py` in a separate interpreter (`make procgen-env` creates
.venv-procgen; `--recorder-python` or WORLDMODEL_PROCGEN_PYTHON points elsewhere) and handed
back in a temporary file.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodel.data.shards import Clip, DatasetInfo, read_index
from worldmodel.data.sources import episode_clips, shard_in_parallel, validation_count
from worldmodel.data.video import resize_frame

PLAYER = Path(__file__).with_name("coinrun_player.py")
# `make procgen-env` creates it beside .venv: in the working folder or the checkout worldmodel runs from
RECORDER_VENV = Path(".venv-procgen/bin/python")
COINRUN_ACTIONS = 15
COINRUN_FPS = 15.0  # procgen's interactive frame rate; one frame per action


@dataclass(frozen=True)
class CoinRunSettings:
    frames: int = 16
    size: int = 64  # procgen renders 64x64; other sizes are area-resampled
    max_steps: int = 1000  # per episode (the reproductions' episode length)
    distribution_mode: str = "hard"  # procgen's default, the one the study used
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < 1 or self.max_steps < self.frames:
            raise ValueError(f"invalid CoinRun settings: {self}")
        if self.distribution_mode not in ("easy", "hard"):
            raise ValueError(f"distribution_mode must be easy or hard, got {self.distribution_mode!r}")


def recorder_python(path: str | os.PathLike | None = None) -> Path:
    """The interpreter with procgen installed; fails naming how to create it."""
    given = path or os.environ.get("WORLDMODEL_PROCGEN_PYTHON")
    checkout = Path(__file__).resolve().parents[3] / RECORDER_VENV
    chosen = Path(given) if given else RECORDER_VENV if RECORDER_VENV.is_file() else checkout
    if not chosen.is_file():
        raise FileNotFoundError(
            f"{chosen}: no Python with procgen to record CoinRun. procgen needs numpy<2, so it lives "
            "in its own environment: run `make procgen-env` (creates .venv-procgen), or pass "
            "--recorder-python / set WORLDMODEL_PROCGEN_PYTHON to a Python where "
            "`pip install procgen-mirror==0.10.7 'numpy<2'` was run"
        )
    return chosen


def episode_seed(settings: CoinRunSettings, episode: int) -> int:
    """The level (and policy seed) of `episode`: distinct per episode and per recording seed."""
    return (settings.seed * 1_000_003 + episode) % (2**31)


def play_episode(
    recorder: Path, seed: int, settings: CoinRunSettings, actions: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Play (or with `actions`, replay) one episode in the recorder's interpreter.

    Returns (frames uint8 (L, size, size, 3), actions int64 (L,), rewards float32 (L,)).
    """
    with tempfile.TemporaryDirectory(prefix="coinrun-") as folder:
        out = Path(folder) / "episode.npz"
        command = [str(recorder), str(PLAYER), "--seed", str(seed), "--out", str(out)]
        command += ["--max-steps", str(settings.max_steps), "--distribution-mode", settings.distribution_mode]
        if actions is not None:
            np.save(Path(folder) / "actions.npy", actions)
            command += ["--actions", str(Path(folder) / "actions.npy")]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the CoinRun recorder ({recorder}) failed on seed {seed}:\n{result.stderr}")
        with np.load(out) as episode:
            frames, taken, rewards = episode["frames"], episode["actions"], episode["rewards"]
    if frames.shape[1:3] != (settings.size, settings.size):
        frames = np.stack([resize_frame(frame, settings.size, settings.size) for frame in frames])
    return frames, taken, rewards


def record_episode(job: tuple[Path, int, CoinRunSettings]) -> tuple[list[Clip], str | None]:
    """One episode's clips, or why it has none (shorter than a clip)."""
    recorder, episode, settings = job
    seed = episode_seed(settings, episode)
    frames, actions, rewards = play_episode(recorder, seed, settings)
    meta = {
        "source": "procgen/coinrun",
        "game": "coinrun",
        "episode": episode,
        "episode_seed": seed,
        "distribution_mode": settings.distribution_mode,
    }
    clips = episode_clips(
        frames, actions, rewards, settings.frames, COINRUN_FPS, f"coinrun_ep{episode:05d}", meta
    )
    return clips, None if clips else f"episode {episode} lasted {len(frames)} steps, under a clip"


def prepare_coinrun(
    episodes: int,
    out: str | os.PathLike,
    settings: CoinRunSettings = CoinRunSettings(),
    val_fraction: float = 0.1,
    clips_per_shard: int = 256,
    workers: int = 1,
    recorder: str | os.PathLike | None = None,
) -> dict:
    """Record `episodes` episodes; the last ceil(fraction * episodes) are val."""
    if episodes < 1:
        raise ValueError("need at least one episode")
    python = recorder_python(recorder)
    n_val = validation_count(episodes, val_fraction)
    jobs = [(python, episode, settings) for episode in range(episodes)]
    info = DatasetInfo(
        frames_per_clip=settings.frames,
        height=settings.size,
        width=settings.size,
        fps=COINRUN_FPS,
        num_actions=COINRUN_ACTIONS,
        source={"kind": "coinrun", "episodes": episodes, **vars(settings)},
    )
    splits = ["val" if episode >= episodes - n_val else "train" for episode in range(episodes)]
    _, short = shard_in_parallel(record_episode, jobs, splits, out, info, clips_per_shard, workers, "episode")
    for reason in short.values():
        print(f"prepare coinrun: {reason}")
    return read_index(out)
