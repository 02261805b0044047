"""One training run: a TrainConfig in, a fitted Trainer out. `train.py` is its Hydra front."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from worldmodel.config import ConfigError, TrainConfig, derive_batch
from worldmodel.data.datamodule import VideoDataModule
from worldmodel.data.pipeline import start_worker_server
from worldmodel.data.tokens import lam_for_tokens, tokenizer_for_tokens
from worldmodel.training.budget import budget_steps, run_size, write_summary
from worldmodel.training.callbacks import (
    EMA,
    REQUEUE_SIGNALS,
    SIGNALS,
    STOP_SIGNALS,
    CheckpointOnException,
    DataPosition,
    NonFiniteError,
    NonFiniteGuard,
    Placement,
    Preemption,
    PreviewVideos,
    Throughput,
)
from worldmodel.training.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_header,
    load_lam,
    load_tokenizer,
    refuse_earlier_checkpoints,
    resolve_resume,
)
from worldmodel.training.modules import (
    DynamicsModule,
    LatentActionModule,
    TokenizerModule,
    WorldModelModule,
)
from worldmodel.training.strategy import build_strategy


def to_train_config(composed: DictConfig) -> TrainConfig:
    """Hydra's composed config -> checked dataclasses; any problem names the field."""
    try:
        # Through a plain container, so keys added with `+` are checked against the schema too.
        plain = OmegaConf.to_container(composed, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), plain))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        message = str(error).splitlines()[0]
        raise ConfigError(f"{key}: {message}") from None


def build_module(config: TrainConfig, data: VideoDataModule, resume: str | None) -> WorldModelModule:
    """The stage's module; a resumed run is rebuilt with the architecture its checkpoint records,
    whatever today's preset table says."""
    recorded = checkpoint_header(resume).get("net_config") if resume else None
    if config.task.stage == "tokenizer":
        return TokenizerModule(config, recorded)
    if config.task.stage == "lam":
        if data.tokens:
            raise ConfigError("data.root: the latent action model reads frames; give it a video folder")
        if config.task.labelled_share and not data.num_actions:
            raise ConfigError(
                f"task.labelled_share: {config.data.root} records no actions to label clips with; "
                "set task.labelled_share=0"
            )
        return LatentActionModule(config, recorded, num_actions=data.num_actions)
    if data.tokens:  # the tokens name their tokenizer; a given checkpoint must be that one
        tokenizer = tokenizer_for_tokens(data.index, config.data.root, config.task.tokenizer_checkpoint)
    else:
        tokenizer = load_tokenizer(config.task.tokenizer_checkpoint)
    lam = None
    if config.task.action_source != "true":  # with tokens, the LAM that labelled them
        lam = (
            lam_for_tokens(data.index, config.data.root, config.task.lam_checkpoint)
            if data.tokens
            else load_lam(config.task.lam_checkpoint)
        )
    return DynamicsModule(config, tokenizer, num_actions=data.num_actions or 0, recorded=recorded, lam=lam)


def build_loggers(config: TrainConfig) -> list:
    run_dir = Path(config.run_dir)
    if config.logger.kind == "csv":
        return [CSVLogger(run_dir, name="logs")]  # logs/version_N: a resumed run adds a version
    os.environ.setdefault("WANDB_SILENT", "true")
    return [
        WandbLogger(
            project=config.logger.project,
            name=config.logger.name or run_dir.name,
            save_dir=str(run_dir),
            offline=config.logger.mode == "offline",
            config=OmegaConf.to_container(OmegaConf.structured(config)),
        )
    ]


def build_trainer(config: TrainConfig) -> L.Trainer:
    trainer_config, run_dir = config.trainer, Path(config.run_dir)
    _, accumulation = derive_batch(
        config.data.global_batch_size, trainer_config.world_size, config.data.micro_batch_size
    )
    checkpoints = run_dir / CHECKPOINT_DIR
    # EMA before Preemption: a preempted step's EMA update must happen before the stop is raised
    # (Lightning runs callbacks in this order), or the saved EMA lags the saved weights by a step.
    ema = [EMA(config.optim.ema_decay)] if config.optim.ema_decay is not None else []
    callbacks = [
        DataPosition(),
        Placement(),
        Throughput(trainer_config.peak_tflops),
        *ema,
        Preemption(),
        NonFiniteGuard(trainer_config.skip_nonfinite_steps),
        CheckpointOnException(checkpoints / "on_exception.ckpt"),
        PreviewVideos(trainer_config.video_every_n_steps, run_dir / "media"),
    ]
    if trainer_config.checkpoint_every_n_steps:
        callbacks.append(
            ModelCheckpoint(
                checkpoints,
                filename="step{step:07d}",
                auto_insert_metric_name=False,
                every_n_train_steps=trainer_config.checkpoint_every_n_steps,
                save_top_k=-1,
                save_last=True,
                # Overwrite, never version: when the interval changes between starts, Lightning
                # does not restore this callback's state and would write `last-v1.ckpt` beside a
                # stale `last.ckpt`.
                enable_version_counter=False,
            )
        )
    in_slurm = "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ
    if trainer_config.accelerator == "gpu" and trainer_config.precision != "32-true":
        # The fp32 matmuls of a bf16 run (the logits over the vocabulary, the frozen tokenizer)
        # on tensor cores as TF32: fp32 accumulation and output, several times the speed of plain
        # fp32. A run that asked for 32-true keeps full fp32 everywhere.
        torch.set_float32_matmul_precision("high")
    return L.Trainer(
        accelerator=trainer_config.accelerator,
        devices=trainer_config.devices,
        num_nodes=trainer_config.num_nodes,
        strategy=build_strategy(config),
        precision=trainer_config.precision,
        max_steps=trainer_config.max_steps,
        accumulate_grad_batches=accumulation,
        gradient_clip_val=config.optim.grad_clip or None,
        val_check_interval=trainer_config.val_every_n_steps * accumulation,
        check_val_every_n_epoch=None,
        limit_val_batches=trainer_config.limit_val_batches,
        limit_train_batches=trainer_config.limit_train_batches,
        overfit_batches=trainer_config.overfit_batches,
        fast_dev_run=trainer_config.fast_dev_run,
        profiler=trainer_config.profiler,
        log_every_n_steps=trainer_config.log_every_n_steps,
        num_sanity_val_steps=0,
        logger=build_loggers(config) if not trainer_config.fast_dev_run else False,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        # Preemption is ours (see callbacks.Preemption): Lightning must not requeue on its own.
        plugins=[SLURMEnvironment(auto_requeue=False)] if in_slurm else None,
        use_distributed_sampler=False,  # the loader splits by rank itself
    )


def prepare(config: TrainConfig) -> tuple[VideoDataModule, WorldModelModule, L.Trainer, str | None]:
    """Everything that can fail on bad input before training starts: data index, tokenizer and
    resume checkpoints, the trainer. Stop signals are heard from here on."""
    if config.data.num_workers:
        start_worker_server(deaf_to=STOP_SIGNALS)  # the signals are the main process's to act on
    SIGNALS.install(config.trainer.signal_grace_s, on_stall=_requeue_after_stall)
    L.seed_everything(config.seed, workers=True)
    overfitting = config.trainer.overfit_batches > 0  # debug=overfit: the same batches every step
    data = VideoDataModule(config.data, consume_on_yield=False, repeat_epoch=overfitting)
    resume = resolve_resume(config.resume, config.run_dir)
    if config.resume is None and not config.trainer.fast_dev_run:  # fast_dev_run saves nothing
        refuse_earlier_checkpoints(config.run_dir)
    module = build_module(config, data, resume)
    if config.scaling.budget:
        size = run_size(config, module, data.index)
        config.trainer.max_steps = budget_steps(config, size)
        module.save_hyperparameters({"config": asdict(config)})  # checkpoints hold the steps that ran
        print(
            f"scaling budget {config.scaling.budget}: {size.parameters / 1e6:.3g}M parameters, "
            f"{size.tokens_per_step} tokens per step -> trainer.max_steps={config.trainer.max_steps}"
        )
    return data, module, build_trainer(config), resume


def run(config: TrainConfig) -> L.Trainer:
    """Train as configured; on a preemption signal, checkpoint and (under SLURM) requeue."""
    return fit(config, *prepare(config))


def fit(config: TrainConfig, data, module, trainer: L.Trainer, ckpt_path: str | None) -> L.Trainer:
    checkpoints = Path(config.run_dir) / CHECKPOINT_DIR
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"preempted at step {trainer.global_step}; checkpoint in {checkpoints}")
        preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        if preemption.received in REQUEUE_SIGNALS:  # the time limit is near; SIGTERM means cancelled
            requeue_if_slurm(trainer.is_global_zero)
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
                # Leave without a result, as submitit does: its launcher waits for the requeued job.
                raise SystemExit(-1) from None
        return trainer
    except NonFiniteError as error:
        if trainer.is_global_zero:
            print(f"stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if not config.trainer.fast_dev_run and not _saved_at(trainer, trainer.global_step):
        trainer.save_checkpoint(checkpoints / "last.ckpt")  # the final steps are never lost
    if not config.trainer.fast_dev_run and data.index is not None:
        summarize(config, data, module, trainer)
    if trainer.is_global_zero:
        print(f"done: {trainer.global_step} steps; checkpoints in {checkpoints}")
    return trainer


def leave_process_group() -> None:
    """What a training process does last after a clean end (train.py): each rank leaves its process
    group while the interpreter is still whole. gloo's threads holding work when it shuts down
    abort the process (seen: a rank of a finished 2-task SLURM job died of SIGABRT, "terminate
    called without an active exception", and the job ended FAILED). Never after an error: a rank
    still inside a collective would hang the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def summarize(
    config: TrainConfig, data: VideoDataModule, module: WorldModelModule, trainer: L.Trainer
) -> None:
    """Write summary.json (size, compute, final losses); budgeted runs validate once more at the
    very end so every size of a sweep reports its loss after the same share of its budget."""
    losses = {"train_loss": trainer.callback_metrics.get("train/loss")}
    if config.scaling.budget:
        trainer.validate(module, datamodule=data, verbose=False)  # resets callback_metrics
    losses["val_loss"] = trainer.callback_metrics.get("val/loss")
    losses = {name: value for name, value in losses.items() if value is not None}
    if trainer.is_global_zero:
        write_summary(
            config.run_dir, config, run_size(config, module, data.index), trainer.global_step, losses
        )


def _saved_at(trainer: L.Trainer, step: int) -> bool:
    every = [c._every_n_train_steps for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    return any(n and step % n == 0 for n in every)


def _requeue_after_stall(signum: int) -> None:
    """A stop signal came but no step could finish: still requeue when it asked for that."""
    if signum in REQUEUE_SIGNALS:
        requeue_if_slurm(int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0)


def requeue_if_slurm(is_global_zero: bool) -> None:
    """Put this SLURM job back in the queue (from rank 0); a failed requeue is an error (exit 1
    with scontrol's output): otherwise the job would end COMPLETED and never come back."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job or not is_global_zero:
        return
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{job}_{array_task}" if os.environ.get("SLURM_ARRAY_JOB_ID") and array_task else job
    try:
        result = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
        failure = (
            None
            if result.returncode == 0
            else f"exit {result.returncode}: {(result.stdout + result.stderr).strip()}"
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = f"{type(error).__name__}: {error}"
    if failure:
        print(
            f"requeue failed: `scontrol requeue {target}` ({failure}). The run is checkpointed; "
            f"submit it again with resume=last.",
            file=sys.stderr,
        )
        raise SystemExit(1)
