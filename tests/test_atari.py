import numpy as np

from tests.conftest import ATARI_SETTINGS
from worldmodel.data.pipeline import ClipSpec, ClipStream
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.sources.atari import play_episode


def clips_by_episode(root):
    """{episode: [(start_step, video, actions, meta-like fields)]} from every shard."""
    import json

    import webdataset as wds

    urls = shard_paths(root, "train") + shard_paths(root, "val")
    episodes = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        stream = ClipStream([sample["__url__"]], ClipSpec(meta["frames"]), 1, train=False)
        batch = next(b for b in stream if b["key"][0] == sample["__key__"])
        episodes.setdefault(meta["episode"], []).append(
            (meta, batch["video"][0].numpy(), batch["actions"][0].numpy())
        )
    return {episode: sorted(clips, key=lambda c: c[0]["start_step"]) for episode, clips in episodes.items()}


def test_replaying_recorded_actions_from_the_recorded_seed_reproduces_the_frames(atari_dir):
    for clips in clips_by_episode(atari_dir).values():
        meta = clips[0][0]
        # clips are consecutive from the episode start: their actions are the whole prefix
        assert [m["start_step"] for m, _, _ in clips] == [
            i * ATARI_SETTINGS.frames for i in range(len(clips))
        ]
        actions = np.concatenate([a for _, _, a in clips])
        frames, replayed_actions, _ = play_episode(
            meta["game"], meta["episode_seed"], ATARI_SETTINGS, actions
        )
        np.testing.assert_array_equal(replayed_actions, actions)
        np.testing.assert_array_equal(frames[: len(actions)], np.concatenate([v for _, v, _ in clips]))


def test_clips_stay_inside_episodes_and_carry_game_metadata(atari_dir):
    index = read_index(atari_dir)
    assert index["num_actions"] == 18 and index["fps"] == 15.0
    assert index["splits"]["train"]["clips"] > 0 and index["splits"]["val"]["clips"] > 0
    for clips in clips_by_episode(atari_dir).values():
        for meta, video, actions in clips:
            assert meta["start_step"] + meta["frames"] <= meta["episode_steps"]
            assert len(meta["rewards"]) == meta["frames"] == len(actions)
            assert actions.min() >= 0 and actions.max() < 18
            assert video.shape == (8, 32, 32, 3)
