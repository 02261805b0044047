"""Which checkpoint a run resumes from: always the newest step, whatever changed between starts."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.training_helpers import train
from worldmodel.training.checkpoint import read_checkpoint, resolve_resume


def test_last_ckpt_stays_the_newest_when_the_checkpoint_interval_changes(tmp_path, sample_dir):
    run_dir = tmp_path / "run"
    first = train(run_dir, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1", sample_dir=sample_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    # Lightning's ModelCheckpoint restores its state only when its settings match; otherwise it
    # used to write `last-v1.ckpt` and leave `last.ckpt` at step 3.
    second = train(
        run_dir,
        "trainer.max_steps=8",
        "trainer.checkpoint_every_n_steps=4",
        "resume=last",
        sample_dir=sample_dir,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("last*")) == ["last.ckpt"]
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8
    assert resolve_resume("last", run_dir) == str(checkpoints / "last.ckpt")


def test_resume_last_chooses_by_the_step_inside_not_the_name_or_the_file_time(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name, step in (("step0000300.ckpt", 300), ("last.ckpt", 31), ("on_exception.ckpt", 12)):
        torch.save({"global_step": step}, checkpoints / name)
        time.sleep(0.01)
    assert resolve_resume("last", tmp_path) == str(checkpoints / "step0000300.ckpt")
    # Equal steps: the newest file wins (an on-exception save after the periodic one).
    torch.save({"global_step": 300}, checkpoints / "on_exception.ckpt")
    os.utime(checkpoints / "on_exception.ckpt", (time.time() + 5, time.time() + 5))
    assert resolve_resume("last", tmp_path) == str(checkpoints / "on_exception.ckpt")


def test_every_load_rebuilds_the_architecture_the_checkpoint_recorded(
    tmp_path, sample_dir, tokenizer_checkpoint, monkeypatch
):
    from dataclasses import replace

    from tests.training_helpers import composed
    from worldmodel.eval.rollout import load_world_model
    from worldmodel.models import presets
    from worldmodel.training.checkpoint import load_tokenizer
    from worldmodel.training.run import prepare, run, to_train_config

    dynamics_dir = tmp_path / "dynamics"
    overrides = (
        "experiment=demo_dynamics",
        "logger=csv",
        f"run_dir={dynamics_dir}",
        f"data.root={sample_dir}",
    )
    overrides += (
        "data.frames=4",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.video_every_n_steps=0",
    )
    overrides += (f"task.tokenizer_checkpoint={tokenizer_checkpoint}", "trainer.checkpoint_every_n_steps=2")
    run(to_train_config(composed(*overrides)))
    dynamics_checkpoint = dynamics_dir / "checkpoints" / "last.ckpt"

    torch.manual_seed(0)
    video = torch.randint(0, 256, (1, 4, 32, 32, 3), dtype=torch.uint8)
    tokenizer_before = load_tokenizer(tokenizer_checkpoint)
    tokens = tokenizer_before.encode(video)
    logits_before = load_world_model(dynamics_checkpoint).dynamics(tokens, torch.full((1, 4), -1))

    # Today's presets change (wider and deeper): checkpoints keep computing what they computed.
    tokenizers = dict(presets.TOKENIZER_PRESETS)
    old = tokenizers["tokenizer_debug"]
    tokenizers["tokenizer_debug"] = replace(old, channels=old.channels * 2, depth=old.depth + 1)
    dynamics = dict(presets.DYNAMICS_PRESETS)
    dynamics["dynamics_debug"] = replace(dynamics["dynamics_debug"], depth=3, dim=64)
    monkeypatch.setattr(presets, "TOKENIZER_PRESETS", tokenizers)
    monkeypatch.setattr(presets, "DYNAMICS_PRESETS", dynamics)

    assert torch.equal(load_tokenizer(tokenizer_checkpoint).encode(video), tokens)
    logits_after = load_world_model(dynamics_checkpoint).dynamics(tokens, torch.full((1, 4), -1))
    assert torch.equal(logits_after, logits_before)
    # Resuming builds the recorded network too, not today's preset.
    _, module, _, resume = prepare(
        to_train_config(composed(*overrides, "resume=last", "trainer.max_steps=4"))
    )
    assert resume == str(dynamics_checkpoint)
    assert module.net_config.depth == 2 and module.net_config.dim == 32
    assert module.tokenizer.config.channels == old.channels


def test_a_fresh_run_refuses_a_run_dir_holding_an_earlier_runs_checkpoints(
    tmp_path, sample_dir, tokenizer_checkpoint
):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    earlier = run_dir / "checkpoints" / "on_exception.ckpt"  # from a crash
    shutil.copy(tokenizer_checkpoint, earlier)
    fresh = train(run_dir, "trainer.max_steps=2", sample_dir=sample_dir)  # resume=null
    assert fresh.returncode == 2, fresh.stderr[-2000:]
    assert f"{run_dir / 'checkpoints'} already holds checkpoints" in fresh.stderr
    assert "on_exception.ckpt" in fresh.stderr and "resume=last" in fresh.stderr
    # nothing written, nothing lost: the earlier run's checkpoint is the only file, unchanged
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["on_exception.ckpt"]
    assert earlier.read_bytes() == Path(tokenizer_checkpoint).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "fsdp"])
def test_sharded_saves_recover_from_every_leftover_of_an_interrupted_save(tmp_path, sample_dir, strategy):
    two_ranks = (f"strategy={strategy}", "trainer.devices=2", "trainer.checkpoint_every_n_steps=2")
    checkpoints = tmp_path / "checkpoints"
    last = checkpoints / "last.ckpt"

    def train_to(step: int) -> None:
        result = train(
            tmp_path,
            *two_ranks,
            f"trainer.max_steps={step}",
            "resume=last",
            sample_dir=sample_dir,
            timeout=240,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert read_checkpoint(last)["global_step"] == step
        assert sorted(path.name for path in checkpoints.glob("last*")) == ["last.ckpt"]

    train_to(2)
    # A crash after the renames, before the removal: a stale, non-empty `.previous`; and one
    # mid-write: a half-written `.partial`.
    shutil.copytree(last, checkpoints / "last.ckpt.previous")
    (checkpoints / "last.ckpt.partial" / "checkpoint").mkdir(parents=True)
    (checkpoints / "last.ckpt.partial" / "checkpoint" / "half").write_bytes(b"\0" * 100)
    train_to(4)
    # A crash between the two renames: no `last.ckpt`, the complete copy is `.previous`.
    os.replace(last, checkpoints / "last.ckpt.previous")
    assert read_checkpoint(resolve_resume("last", tmp_path))["global_step"] == 4
    train_to(6)


def test_a_failed_requeue_is_reported_and_exits_non_zero(monkeypatch, capsys):
    from worldmodel.training.run import requeue_if_slurm

    # A job id no controller knows (and, on a machine without SLURM, no scontrol at all).
    monkeypatch.setenv("SLURM_JOB_ID", "999999999")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with pytest.raises(SystemExit) as stopped:
        requeue_if_slurm(is_global_zero=True)
    assert stopped.value.code == 1
    assert "requeue failed: `scontrol requeue 999999999`" in capsys.readouterr().err


@pytest.mark.slow
def test_a_preempted_dynamics_run_with_ema_resumes_exactly(tmp_path, atari_dir, tokenizer_checkpoint):
    from tests.training_helpers import preempted_and_resumed

    dynamics = (
        "task=dynamics",
        "model=dynamics_debug",
        f"task.tokenizer_checkpoint={tokenizer_checkpoint}",
        "optim.ema_decay=0.5",
        "optim.schedule_steps=20",
        "trainer.max_steps=20",
        "trainer.checkpoint_every_n_steps=0",
        "data.num_workers=1",
    )
    stopped_at, expected, after = preempted_and_resumed(
        tmp_path / "full", tmp_path / "cut", *dynamics, sample_dir=atari_dir
    )
    assert stopped_at < 20 and sorted(after) == list(range(stopped_at, 20))
    assert [after[step] for step in after] == [expected[step] for step in after]
    final_full = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    final_cut = read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    for entry in ("state_dict", "ema"):
        for name, value in final_full[entry].items():
            assert torch.equal(value, final_cut[entry][name]), (entry, name)


@pytest.mark.slow
def test_the_dynamics_stage_trains_alike_under_ddp_zero3_and_fsdp_on_two_processes(
    tmp_path, atari_dir, tokenizer_checkpoint
):
    from tests.training_helpers import logged

    losses = {}
    strategies = ("ddp", "deepspeed_zero3", "fsdp")
    for strategy in strategies:
        # ZeRO-3 partitions every tensor, as it does a real preset's (dynamics_debug's are all
        # below the default threshold): the head's weight is read outside any module's forward.
        partitioned = ("strategy.persistence_threshold=0",) if strategy == "deepspeed_zero3" else ()
        result = train(
            tmp_path / strategy,
            "task=dynamics",
            "model=dynamics_debug",
            f"task.tokenizer_checkpoint={tokenizer_checkpoint}",
            f"strategy={strategy}",
            *partitioned,
            "trainer.devices=2",
            "trainer.max_steps=4",
            "trainer.checkpoint_every_n_steps=0",
            sample_dir=atari_dir,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        losses[strategy] = logged(tmp_path / strategy, "train/loss")
    assert sorted(losses["ddp"]) == [0, 1, 2, 3]
    for strategy in strategies[1:]:
        for step, loss in losses["ddp"].items():
            assert losses[strategy][step] == pytest.approx(loss, rel=1e-5), (strategy, step)


@pytest.mark.slow
def test_ranks_run_the_same_number_of_validation_batches_on_an_uneven_split(tmp_path, sample_dir):
    import webdataset as wds

    from tests.training_helpers import logged

    # 5 validation clips, batches of 2 on 2 ranks: rank 0 holds clips 0, 2, 4 (2 batches),
    # rank 1 clips 1, 3 (1 batch). ZeRO-3's forward is collective: unequal counts hang.
    val = tmp_path / "val-000000.tar"
    with wds.TarWriter(str(val)) as writer:
        for sample in list(wds.WebDataset(str(sample_dir / "val-000000.tar"), shardshuffle=False))[:5]:
            writer.write({key: value for key, value in sample.items() if key != "__url__"})
    result = train(
        tmp_path / "run",
        "strategy=deepspeed_zero3",
        "strategy.persistence_threshold=0",  # every parameter partitioned: each forward gathers
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.val_every_n_steps=2",
        "trainer.limit_val_batches=10",
        "trainer.checkpoint_every_n_steps=0",
        "data.root=null",
        f"data.train_shards=['{sample_dir}/train-{{000000..000002}}.tar']",
        f"data.val_shards=[{val}]",
        "data.num_workers=1",
        sample_dir=sample_dir,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert 1 in logged(tmp_path / "run", "val/loss")


def _start_until_training(run_dir, *overrides, sample_dir):
    """start_training in its own process group, returning once fit has begun (the model summary
    is printed)."""
    from tests.training_helpers import start_training

    process = start_training(run_dir, *overrides, sample_dir=sample_dir, start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "Trainable params" in line:
            return process, seen
    raise AssertionError("".join(seen)[-3000:])


@pytest.mark.slow
def test_a_signal_before_the_first_step_checkpoints_at_the_first_safe_point(tmp_path, sample_dir):
    import signal

    slow_shard = f"pipe:sleep 15 && cat {sample_dir}/train-000000.tar"  # data arrives late
    process, seen = _start_until_training(
        tmp_path,
        "data.root=null",
        f"data.train_shards=['{slow_shard}']",
        f"data.val_shards=['{sample_dir}/val-000000.tar']",
        "data.num_workers=0",
        "trainer.max_steps=50",
        sample_dir=sample_dir,
    )
    process.send_signal(signal.SIGUSR1)  # while the loader waits for its first batch
    output, _ = process.communicate(timeout=120)
    output = "".join(seen) + output
    assert process.returncode == 0 and "preempted at step" in output, output[-3000:]
    assert int(output.split("preempted at step ")[1].split(";")[0]) <= 1
    assert (tmp_path / "checkpoints" / "on_exception.ckpt").is_file()


def test_a_signal_ends_a_run_that_can_never_reach_a_step_within_the_grace_period(tmp_path, sample_dir):
    import signal

    process, seen = _start_until_training(
        tmp_path,
        "data.root=null",
        "data.train_shards=['pipe:sleep 600']",  # a data stall: no batch ever comes
        f"data.val_shards=['{sample_dir}/val-000000.tar']",
        "data.num_workers=1",
        "trainer.signal_grace_s=3",
        sample_dir=sample_dir,
    )
    time.sleep(3)  # past on_train_start: waiting for a batch that never comes
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=30) == 1
        assert time.monotonic() - started < 30
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # what the stalled loader started (`sleep 600`)
    output = "".join(seen) + process.stdout.read()
    assert "SIGTERM received 3 s ago and no step finished" in output, output[-3000:]
