"""`worldmodel prepare atari`: record real game play with ale-py (its ROMs ship in the wheel).

Each episode is played by a random policy that draws an action uniformly from the full set and
holds it for a random number of steps (uniform in 1..max_hold; by default 1, a new action every
step, so the past frames never tell the next action), with frameskip 4 and no sticky actions by
default, starting from `env.reset(seed=episode_seed)`. Without sticky actions the recorded
action is the one the emulator executed. Frames are the
observations resized to size x size; action t is the one taken after frame t (so it leads to
frame t + 1). Episodes are cut into consecutive clips that never cross an episode end, encoded
losslessly: replaying the recorded actions from the recorded seed reproduces the frames exactly.
Actions use the full 18-action set, so one model can train on several games.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worldmodel.data.shards import Clip, DatasetInfo, read_index
from worldmodel.data.sources import episode_clips, shard_in_parallel, validation_count
from worldmodel.data.video import resize_frame

FULL_ACTION_SET_SIZE = 18
ATARI_FPS = 60.0  # the console's frame rate; a recorded frame lasts `frameskip` of them


@dataclass(frozen=True)
class AtariSettings:
    frames: int = 16
    size: int = 64
    frameskip: int = 4
    sticky: float = 0.0  # repeat_action_probability: the emulator repeats the previous action
    max_hold: int = 1  # the policy holds each random action for 1..max_hold steps
    max_steps: int = 2000  # per episode; long timer games are cut here
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.frames < 1
            or self.size < 1
            or self.frameskip < 1
            or self.max_hold < 1
            or self.max_steps < self.frames
        ):
            raise ValueError(f"invalid Atari settings: {self}")
        if not 0.0 <= self.sticky < 1.0:
            raise ValueError(f"sticky must be in [0, 1), got {self.sticky}")

    @property
    def fps(self) -> float:
        return ATARI_FPS / self.frameskip


def make_env(game: str, settings: AtariSettings):
    """The ALE environment of `game` (e.g. "Breakout") with the recording settings."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env_id = f"ALE/{game}-v5"
    try:
        return gym.make(
            env_id,
            frameskip=settings.frameskip,
            repeat_action_probability=settings.sticky,
            full_action_space=True,
        )
    except gym.error.Error as error:
        raise ValueError(f"unknown Atari game {game!r} ({env_id}): {error}") from error


def episode_seed(settings: AtariSettings, game: str, episode: int) -> int:
    """A distinct, reproducible seed per (game, episode)."""
    game_code = zlib.crc32(game.encode())  # the whole name: Asteroids and Asterix differ
    return (settings.seed * 1_000_003 + game_code * 10_007 + episode) % (2**31)


def play_episode(game: str, seed: int, settings: AtariSettings, actions: Sequence[int] | None = None):
    """Play one episode from `reset(seed)`; random actions unless `actions` are given to replay.

    Returns (frames uint8 (L, size, size, 3), actions int64 (L,), rewards float32 (L,)) where
    action t and reward t follow frame t. The episode's final observation has no action after
    it and is not kept.
    """
    env = make_env(game, settings)
    policy = np.random.default_rng(seed)
    observation, _ = env.reset(seed=seed)
    frames, taken, rewards = [], [], []
    limit = settings.max_steps if actions is None else len(actions)
    held = 0  # steps left of the current random action
    for step in range(limit):
        if actions is not None:
            action = int(actions[step])
        elif held == 0:
            action = int(policy.integers(env.action_space.n))
            held = int(policy.integers(1, settings.max_hold + 1))
        held -= 1
        frames.append(resize_frame(observation, settings.size, settings.size))
        observation, reward, terminated, truncated, _ = env.step(action)
        taken.append(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    env.close()
    return np.stack(frames), np.asarray(taken, np.int64), np.asarray(rewards, np.float32)


def record_episode(job: tuple[str, int, AtariSettings]) -> list[Clip]:
    """Play one episode and cut it into consecutive clips of `settings.frames` frames."""
    game, episode, settings = job
    seed = episode_seed(settings, game, episode)
    frames, actions, rewards = play_episode(game, seed, settings)
    meta = {
        "source": f"atari/{game}",
        "game": game,
        "episode": episode,
        "episode_seed": seed,
        "frameskip": settings.frameskip,
        "sticky": settings.sticky,
    }
    return episode_clips(
        frames, actions, rewards, settings.frames, settings.fps, f"{game}_ep{episode:05d}", meta
    )


def _record(job: tuple[str, int, AtariSettings]) -> tuple[list[Clip], None]:
    return record_episode(job), None  # a failing emulator is a bug to surface, not a bad file


def prepare_atari(
    games: Sequence[str],
    episodes: int,
    out: str | os.PathLike,
    settings: AtariSettings = AtariSettings(),
    val_fraction: float = 0.1,
    clips_per_shard: int = 256,
    workers: int = 1,
) -> dict:
    """Record `episodes` episodes of each game; the last ceil(fraction * episodes) are val."""
    if episodes < 1 or not games:
        raise ValueError("need at least one game and one episode")
    for game in games:  # fail on a misspelled game before spending minutes on the others
        make_env(game, settings).close()
    n_val = validation_count(episodes, val_fraction)
    jobs = [(game, episode, settings) for game in games for episode in range(episodes)]
    info = DatasetInfo(
        frames_per_clip=settings.frames,
        height=settings.size,
        width=settings.size,
        fps=settings.fps,
        num_actions=FULL_ACTION_SET_SIZE,
        source={"kind": "atari", "games": list(games), "episodes": episodes, **vars(settings)},
    )
    splits = ["val" if episode >= episodes - n_val else "train" for _, episode, _ in jobs]
    shard_in_parallel(_record, jobs, splits, out, info, clips_per_shard, workers, "episode")
    return read_index(out)
