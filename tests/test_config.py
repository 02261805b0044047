import pytest
import webdataset as wds

from worldmodel.config import ConfigError, DataConfig, TaskConfig, derive_batch
from worldmodel.data.datamodule import VideoDataModule
from worldmodel.data.pipeline import BadSample, ClipSpec, decode_sample


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"frames": 0}, "data.frames"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"fps": -2.0}, "data.fps"),
        ({"max_skip_fraction": 1.5}, "data.max_skip_fraction"),
        ({"root": None}, "data.root"),
        ({"micro_batch_size": 0}, "data.micro_batch_size"),
    ],
)
def test_bad_values_fail_on_creation_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"context_noise": 1.0}, "task.context_noise"),
        ({"rollout_context": 1.5}, "task.rollout_context"),
        ({"clean_context": False, "rollout_context": 0.5}, "task.rollout_context"),
    ],
)
def test_bad_task_values_fail_on_creation_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        TaskConfig(**overrides)


def test_batch_plan_from_the_global_batch_size():
    assert derive_batch(32, 4) == (8, 1)
    assert derive_batch(32, 2, micro_batch_size=4) == (4, 4)
    with pytest.raises(ConfigError, match="data.global_batch_size: 30 does not divide over 4 devices"):
        derive_batch(30, 4)
    with pytest.raises(ConfigError, match="micro_batch_size 4 x 3 devices = 12"):
        derive_batch(32, 3, micro_batch_size=4)


def test_data_module_checks_clip_length_rate_and_division_against_the_dataset(sample_dir):
    with pytest.raises(ConfigError, match="data.frames: 20 frames"):
        VideoDataModule(DataConfig(root=str(sample_dir), frames=20))
    with pytest.raises(ConfigError, match="data.fps"):
        VideoDataModule(DataConfig(root=str(sample_dir), fps=7.0))
    data = VideoDataModule(DataConfig(root=str(sample_dir), frames=8, fps=12.5), rank=0, world_size=2)
    assert data.spec.stride == 2 and data.micro_batch_size == 4
    with pytest.raises(ConfigError, match="does not divide over 3 devices"):
        VideoDataModule(
            DataConfig(root=str(sample_dir), global_batch_size=8), world_size=3
        ).train_dataloader()


def test_data_module_streams_batches_of_the_per_device_size(sample_dir):
    config = DataConfig(
        root=str(sample_dir), frames=8, global_batch_size=4, num_workers=0, batches_per_epoch=2
    )
    data = VideoDataModule(config, rank=1, world_size=2)
    batches = list(data.train_dataloader())
    assert len(batches) == 2 and batches[0]["video"].shape == (2, 8, 64, 64, 3)
    assert sum(len(b["key"]) for b in data.val_dataloader()) == 13  # half of the 26 validation clips


def test_shards_from_brace_patterns_and_pipe_urls(sample_dir):
    config = DataConfig(
        root=None,
        train_shards=[f"{sample_dir}/train-{{000000..000002}}.tar"],
        val_shards=[f"pipe:cat {sample_dir}/val-000000.tar"],
        frames=8,
        global_batch_size=5,
        num_workers=0,
        batches_per_epoch=3,
    )
    data = VideoDataModule(config)
    assert len(data._urls("train")) == 3
    assert [len(b["key"]) for b in data.train_dataloader()] == [5, 5, 5]
    assert sum(len(b["key"]) for b in data.val_dataloader()) == 26


def test_shard_urls_without_validation_urls_are_rejected_by_name():
    with pytest.raises(ConfigError, match="data.val_shards"):
        DataConfig(root=None, train_shards=["/x/train-{000000..000001}.tar"])
    with pytest.raises(ConfigError, match="data.seed"):
        DataConfig(seed=-1)


def test_shard_urls_with_actions_need_the_action_space_and_out_of_range_actions_are_skipped(atari_dir):
    urls = dict(
        root=None,
        train_shards=[f"{atari_dir}/train-000000.tar"],
        val_shards=[f"{atari_dir}/val-000000.tar"],
        frames=8,
        global_batch_size=2,
        num_workers=0,
        batches_per_epoch=1,
    )
    with pytest.raises(
        ConfigError, match=r"data.num_actions: the samples of .*train-000000.tar carry actions"
    ):
        VideoDataModule(DataConfig(**urls))
    data = VideoDataModule(DataConfig(**urls, num_actions=18))
    assert data.num_actions == 18
    batch = next(iter(data.train_dataloader()))
    assert batch["actions"].max() < 18 and batch["actions"].min() >= 0
    with pytest.raises(ConfigError, match="data.num_actions: 4, but"):
        VideoDataModule(DataConfig(root=str(atari_dir), frames=8, num_actions=4))
    # A stated action set smaller than the samples use: the sample is bad (skipped and counted).
    raw = next(iter(wds.WebDataset(urls["train_shards"], shardshuffle=False)))
    assert decode_sample(raw, ClipSpec(8, num_actions=18), None)["actions"].shape == (8,)
    with pytest.raises(BadSample, match="outside") as bad:
        decode_sample(raw, ClipSpec(8, num_actions=1), None)
    assert bad.value.cause == "actions"
