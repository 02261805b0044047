import subprocess

import numpy as np
import pytest

from tests.test_atari import clips_by_episode
from tests.training_helpers import ROOT
from worldmodel.data.shards import read_index
from worldmodel.data.sources.coinrun import CoinRunSettings, play_episode, prepare_coinrun, recorder_python

SETTINGS = CoinRunSettings(frames=8, max_steps=40)


@pytest.fixture(scope="module")
def coinrun_dir(tmp_path_factory):
    """Three short episodes recorded by the command users run (procgen in .venv-procgen)."""
    out = tmp_path_factory.mktemp("coinrun")
    command = [str(ROOT / ".venv" / "bin" / "worldmodel"), "prepare", "coinrun", "--episodes", "3"]
    command += ["--max-steps", "40", "--frames", "8", "--val-fraction", "0.3", "--workers", "1"]
    subprocess.run([*command, "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    return out


def test_replaying_recorded_actions_from_the_recorded_seed_reproduces_the_frames(coinrun_dir):
    episodes = clips_by_episode(coinrun_dir)
    assert sorted(episodes) == [0, 1, 2]
    for clips in episodes.values():
        meta = clips[0][0]
        assert [m["start_step"] for m, _, _ in clips] == [i * SETTINGS.frames for i in range(len(clips))]
        actions = np.concatenate([a for _, _, a in clips])
        frames, replayed, _ = play_episode(recorder_python(), meta["episode_seed"], SETTINGS, actions)
        np.testing.assert_array_equal(replayed, actions)
        np.testing.assert_array_equal(frames[: len(actions)], np.concatenate([v for _, v, _ in clips]))
        # and the frames follow the actions: other actions from the same level play differently
        other, _, _ = play_episode(recorder_python(), meta["episode_seed"], SETTINGS, (actions + 1) % 15)
        assert not np.array_equal(other[: len(actions)], frames[: len(actions)])


def test_episodes_are_distinct_levels_cut_into_clips_that_stay_inside_them(coinrun_dir):
    index = read_index(coinrun_dir)
    assert index["num_actions"] == 15 and index["source"]["kind"] == "coinrun"
    assert index["splits"]["val"]["clips"] == 5  # the last episode of three, 40 steps in clips of 8
    episodes = clips_by_episode(coinrun_dir)
    first_frames = [clips[0][1][0] for clips in episodes.values()]
    assert not np.array_equal(first_frames[0], first_frames[1])  # each episode its own level
    for clips in episodes.values():
        for meta, video, actions in clips:
            assert meta["game"] == "coinrun" and meta["start_step"] + meta["frames"] <= meta["episode_steps"]
            assert len(meta["rewards"]) == len(actions) == 8 and 0 <= actions.min() <= actions.max() < 15
            assert video.shape == (8, 64, 64, 3)


def test_without_procgen_the_error_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make procgen-env"):
        prepare_coinrun(1, tmp_path, SETTINGS, recorder=tmp_path / "no-python")
