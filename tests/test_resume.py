"""Which checkpoint a run resumes from: always the newest step, whatever changed between starts."""

import os
import time

import torch

from tests.training_helpers import train
from worldmodel.training.checkpoint import read_checkpoint, resolve_resume


def test_last_ckpt_stays_the_newest_when_the_checkpoint_interval_changes(tmp_path, sample_dir):
    run_dir = tmp_path / "run"
    first = train(
        run_dir, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1", sample_dir=sample_dir
    )
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
