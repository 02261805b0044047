"""A diverging run stops at the step that diverged, names it, and never saves the diverged state."""

import pytest
import torch

from tests.training_helpers import composed, logged, train
from worldmodel.training.checkpoint import CheckpointError, read_checkpoint, resolve_resume
from worldmodel.training.modules import TokenizerModule
from worldmodel.training.run import to_train_config

DIVERGE = ("optim.lr=1e6", "optim.grad_clip=0", "optim.warmup_steps=1")


def finite(checkpoint: dict) -> bool:
    return all(
        torch.isfinite(value).all()
        for value in checkpoint["state_dict"].values()
        if value.is_floating_point()
    )


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing_diverged(tmp_path, sample_dir):
    run_dir = tmp_path / "run"
    diverged = train(
        run_dir, *DIVERGE, "trainer.max_steps=10", "trainer.checkpoint_every_n_steps=1", sample_dir=sample_dir
    )
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    assert "training diverged at step" in diverged.stderr and "optim.lr=1000000.0" in diverged.stderr
    assert "bincount" not in diverged.stderr  # not a crash inside the codebook statistics
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "on_exception.ckpt").exists()
    saved = sorted(checkpoints.glob("*.ckpt"))
    assert all(finite(read_checkpoint(path)) for path in saved)
    stopped_at = int(diverged.stderr.split("training diverged at step ")[1].split(":")[0])
    resume = resolve_resume("last", run_dir)
    assert resume is None or read_checkpoint(resume)["global_step"] <= stopped_at


def test_skip_nonfinite_steps_skips_that_many_steps_then_stops(tmp_path, sample_dir):
    common = (*DIVERGE, "trainer.max_steps=10", "trainer.checkpoint_every_n_steps=0")
    stop = train(tmp_path / "stop", *common, sample_dir=sample_dir)
    skip = train(tmp_path / "skip", *common, "trainer.skip_nonfinite_steps=2", sample_dir=sample_dir)
    assert stop.returncode == 1 and skip.returncode == 1, stop.stderr[-2000:] + skip.stderr[-2000:]

    def step_of(result):
        return int(result.stderr.split("training diverged at step ")[1].split(":")[0])

    # Weights that produced a non-finite step are kept as they were, so the next step fails too.
    assert step_of(skip) == step_of(stop) + 2
    assert skip.stdout.count("step skipped") == 2
    assert max(logged(tmp_path / "skip", "train/skipped_steps").values()) == 2


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    module = TokenizerModule(to_train_config(composed("experiment=demo_tokenizer", f"run_dir={tmp_path}")))
    module.configure_model()
    with torch.no_grad():
        next(module.net.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="not finite"):
        module.on_save_checkpoint({})


def test_skipping_is_refused_at_startup_under_deepspeed(tmp_path):
    with pytest.raises(Exception, match="skip_nonfinite_steps"):
        to_train_config(
            composed("strategy=deepspeed_zero2", "trainer.skip_nonfinite_steps=1", f"run_dir={tmp_path}")
        )
