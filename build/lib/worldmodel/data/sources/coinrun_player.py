"""Play one CoinRun episode with procgen and save its frames and actions (`prepare coinrun` runs it).

A standalone script with no worldmodel imports: procgen's wheels pin numpy<2 and gym<1, so it runs
in its own environment (`make procgen-env`: .venv-procgen) and hands its episode back in a file.

    python coinrun_player.py --seed 7 --max-steps 1000 --out episode.npz [--actions replay.npy]

The level is `start_level=seed, num_levels=1` and the policy a generator seeded with `seed` that
draws one of the 15 actions uniformly at every step (the CoinRun study of Genie and its
reproductions records random-action episodes the same way), so (seed, actions) replays the
frames exactly. Frame t is the observation before action t; the episode's last observation
(after its final action, when procgen has already reset) is not kept.
"""

from __future__ import annotations

import argparse

import numpy as np


def play(seed: int, max_steps: int, distribution_mode: str, actions: np.ndarray | None = None):
    from procgen import ProcgenGym3Env

    env = ProcgenGym3Env(
        num=1,
        env_name="coinrun",
        start_level=seed,
        num_levels=1,
        distribution_mode=distribution_mode,
        rand_seed=seed,
    )
    policy = np.random.default_rng(seed)
    action_count = env.ac_space.eltype.n  # 15
    frames, taken, rewards = [], [], []
    _, observation, _ = env.observe()
    for step in range(max_steps if actions is None else len(actions)):
        action = int(policy.integers(action_count)) if actions is None else int(actions[step])
        frames.append(observation["rgb"][0].copy())  # (64, 64, 3) uint8
        env.act(np.array([action]))
        reward, observation, first = env.observe()
        taken.append(action)
        rewards.append(float(reward[0]))
        if first[0]:  # the episode ended with this action; procgen already shows the next level
            break
    return np.stack(frames), np.asarray(taken, np.int64), np.asarray(rewards, np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--distribution-mode", default="hard")
    parser.add_argument("--actions", default=None, help=".npy of actions to replay instead of drawing them")
    parser.add_argument("--out", required=True, help=".npz with frames, actions, rewards")
    args = parser.parse_args()
    replay = np.load(args.actions) if args.actions else None
    frames, actions, rewards = play(args.seed, args.max_steps, args.distribution_mode, replay)
    np.savez(args.out, frames=frames, actions=actions, rewards=rewards)


if __name__ == "__main__":
    main()
