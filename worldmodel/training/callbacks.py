"""Callbacks: the data position, where each rank runs, throughput and MFU, preview videos,
preemption signals, the guard against non-finite steps."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from worldmodel.data.video import encode_mp4

# Dense bf16 peak of one GPU, by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


class DataPosition(L.Callback):
    """Records in the loader the batches that were trained on, not the ones prefetched.

    Lightning fetches a batch ahead; the loader's checkpointed position must only count batches
    whose step ran, so a resumed run sees exactly the next ones.
    """

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        trainer.datamodule.train_loader.mark_consumed(batch)

    def on_train_epoch_end(self, trainer, module) -> None:
        # An epoch cut short by limit_train_batches is over: a resume starts the next one. One
        # cut short by max_steps is not (a longer resumed run continues it).
        if trainer.max_steps == -1 or trainer.global_step < trainer.max_steps:
            trainer.datamodule.train_loader.end_epoch()


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of the best of some fp32 matmuls on this process's threads: the CPU's practical peak.
    The best of 20 (~0.3 s on 2 cores), because any process that shares the cores meanwhile (a loader
    worker starting up) lowers the peak and inflates every MFU of the run after it."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up the kernels
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def device_peak_flops(module: L.LightningModule, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of the module's device: configured, else `peak_flops(device)`."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    return peak_flops(module.device)


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device: Lightning's table for the GPU (ours for the names it misses,
    e.g. a plain "NVIDIA H200"), measured on CPU; None (MFU not logged, a warning) for a GPU
    nobody knows."""
    if device.type != "cuda":
        return measure_cpu_peak_flops()
    from lightning.fabric.utilities.throughput import get_available_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own "unknown device" warning; ours follows
        flops = get_available_flops(device, torch.bfloat16)
    if flops:
        return float(flops)
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    warnings.warn(
        f"no peak FLOP/s known for {name!r}: MFU is not logged (set trainer.peak_tflops)", stacklevel=1
    )
    return None


class Placement(L.Callback):
    """Every rank of a distributed run says where it runs (node, local rank, the main address
    it rendezvoused at): the first thing to read when a multi-node job hangs or is slow."""

    def setup(self, trainer, module, stage: str) -> None:
        if trainer.world_size == 1:
            return
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        main = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        print(
            f"rank {trainer.global_rank}/{trainer.world_size}: node {trainer.node_rank} ({host}), "
            f"local rank {trainer.local_rank}, main address {main}",
            flush=True,
        )


class Throughput(L.Callback):
    """Tokens/s and clips/s per device, MFU, the fraction of step time spent waiting for data, and
    on GPUs the peak memory allocated."""

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self.peak_flops: float | None = None
        self._batch_end: float | None = None
        self._wait = 0.0

    def on_fit_start(self, trainer, module) -> None:
        # Before the sanity check and the loaders start their workers, which would share the cores.
        self.peak_flops = device_peak_flops(module, self.peak_tflops)
        if self.peak_flops:
            module.print(f"MFU against a peak of {self.peak_flops / 1e12:.2f} TFLOP/s per device")

    def restart(self) -> None:
        """Forget the last step's end: validation or a preview ran since, which is not data wait."""
        self._batch_end = None

    def on_validation_end(self, trainer, module) -> None:
        self.restart()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._wait = 0.0 if self._batch_end is None else time.perf_counter() - self._batch_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:  # the first batch includes start-up: not a measurement
            step = now - self._batch_end
            video = module.video_like(batch)
            frames, tokens_per_frame = module.token_grid(video)
            clips, tokens = len(video), len(video) * frames * tokens_per_frame
            achieved = module.flops_per_token(video) * tokens / step
            measured = {
                "perf/clips_per_s": clips / step,
                "perf/tokens_per_s": tokens / step,
                "perf/data_wait": self._wait / step,
            }
            if module.device.type == "cuda":  # what the allocator held at most, this run so far
                measured["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(module.device) / 1e9
            if self.peak_flops:
                measured["perf/mfu"] = achieved / self.peak_flops
                module.log("mfu", achieved / self.peak_flops, prog_bar=True, logger=False)
            module.log_dict(measured, prog_bar=False)
        self._batch_end = now


class EMA(L.Callback):
    """An exponential moving average of the network's weights, kept in fp32, saved as `ema`.

    A callback so that it updates before ModelCheckpoint (which Lightning runs last) saves:
    a checkpoint holds the EMA of exactly the steps it holds the weights of.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.weights: dict[str, torch.Tensor] | None = None
        self._updated_at = -1

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._updated_at:  # accumulating: no optimizer step yet
            return
        self._updated_at = trainer.global_step
        current = {name: p.detach().float() for name, p in module.net.named_parameters()}
        if self.weights is None:
            self.weights = {name: value.clone() for name, value in current.items()}
            return
        for name, value in current.items():
            self.weights[name].lerp_(value, 1 - self.decay)

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if self.weights is not None:
            checkpoint["ema"] = {name: value.cpu() for name, value in self.weights.items()}

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.weights = {name: value.to(module.device) for name, value in checkpoint["ema"].items()}
            self._updated_at = checkpoint["global_step"]


class PreviewVideos(L.Callback):
    """Every N steps, an mp4 of the model at work (computed on every rank, written by rank 0),
    also logged to wandb when it is the logger."""

    def __init__(self, every_n_steps: int, folder: str | os.PathLike, fps: float = 10.0):
        self.every_n_steps = every_n_steps
        self.folder = Path(folder)
        self.fps = fps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        if getattr(self, "_last_step", None) == step:  # once per optimizer step under accumulation
            return
        self._last_step = step
        was_training = module.training
        module.eval()
        video = module.preview(batch).cpu().numpy()  # (T, H, W, 3) uint8; every rank: ZeRO-3 needs them all
        module.train(was_training)
        for callback in trainer.callbacks:  # this step's time is not a training measurement
            if isinstance(callback, Throughput):
                callback.restart()
        if not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"preview_step{step:07d}.mp4"
        path.write_bytes(encode_mp4(video, self.fps))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"preview": wandb.Video(str(path), format="mp4")}, step=step)


# What a scheduler sends shortly before a time limit or preemption: SIGUSR1 from
# `sbatch --signal=USR1@...` (slurm/train.sbatch), SIGUSR2 from submitit (Hydra's submitit launchers).
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, *REQUEUE_SIGNALS)


class Signals:
    """The stop signals a process received, heard from the moment it starts (`install`), not only
    once training runs: a signal during setup or data loading is acted on at the first safe point.

    A signal must also end the run when no safe point ever comes (a data stall, a hung
    collective): `grace_s` seconds after it, a watchdog calls `on_stall(signum)` (which logs,
    requeues where the signal asks for it) and exits the process with status 1, keeping the
    last checkpoint; no state from inside an unfinished step is ever saved."""

    def __init__(self):
        self.received: int | None = None
        self.stopping = False  # a safe point was reached: the normal stop (checkpoint, exit) runs
        self.grace_s: float = 180.0
        self.on_stall = None  # (signum) -> None, before the watchdog's exit
        self.forward = None  # (signum) -> None: hand the signal on to ranks this process started

    def install(self, grace_s: float, on_stall=None) -> None:
        self.grace_s, self.on_stall = grace_s, on_stall
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self.forward is not None:
            self.forward(signum)
        threading.Thread(target=self._watchdog, args=(signum,), daemon=True).start()

    def _watchdog(self, signum: int) -> None:
        time.sleep(self.grace_s)
        if self.stopping:  # however long its checkpoint takes, the normal stop is under way
            return
        print(
            f"{signal.Signals(signum).name} received {self.grace_s:.0f} s ago and no step finished "
            f"since (a data stall or a hung collective?): exiting without a new checkpoint; the "
            f"last one stands (trainer.signal_grace_s sets this wait)",
            file=sys.stderr,
            flush=True,
        )
        if self.on_stall is not None:
            self.on_stall(signum)
        os._exit(1)


SIGNALS = Signals()  # one per process: signal handlers are process-wide


class Preemption(L.Callback):
    """SIGTERM, SIGUSR1 or SIGUSR2: finish the current optimizer step on every rank, then checkpoint.

    Lightning's own SIGTERM handling stops after the current micro-batch, which under gradient
    accumulation throws away a partly accumulated step; this holds the signal until the step
    boundary, where the ranks agree (one all-reduce) and all raise SIGTERMException together, so
    CheckpointOnException saves on all of them. A signal received before training started is
    acted on at its start. Which signal came decides what happens next: SIGUSR1 / SIGUSR2
    (REQUEUE_SIGNALS) requeue the job under SLURM, SIGTERM (scancel, or the limit itself) does not.
    """

    def __init__(self, signals: Signals = SIGNALS):
        self.signals = signals
        self._step_at_start = -1

    @property
    def received(self) -> int | None:
        return self.signals.received

    def on_train_start(self, trainer, module) -> None:
        # Again: Lightning registered its own SIGTERM handler when fit started; this replaces it.
        launcher = trainer.strategy.launcher
        if launcher is not None:  # ranks that Lightning started itself hear it too
            self.signals.forward = launcher.kill
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.signals.handle)
        self._stop_if_signalled(trainer)  # one that came during setup

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_start:  # mid-accumulation: the step is not done
            return
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self.signals.stopping = True
            raise SIGTERMException()


class NonFiniteError(RuntimeError):
    """Training diverged: a loss or gradient norm is not finite. The message says where and why."""


class NonFiniteGuard(L.Callback):
    """Stops the run at the first optimizer step whose loss or gradient norm is not finite, before
    the optimizer applies it; or skips up to `max_skips` such steps (their gradients are dropped,
    so AdamW leaves weights and moments untouched), counted in `train/skipped_steps`.

    Every rank reaches the same decision (one all-reduce of a flag a step), so all stop together.
    It also logs `train/grad_norm`, the norm it checks (DeepSpeed keeps its gradients: there the
    engine's norm is logged by the module and only the loss is checked here)."""

    def __init__(self, max_skips: int = 0):
        self.max_skips = max_skips
        self.skipped = 0
        self._bad_loss: float | None = None  # a non-finite loss of this step's micro-batches

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            self._bad_loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        gradients = [p.grad for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients) if gradients else None
        if norm is not None:
            module.log("train/grad_norm", norm)
        local = self._bad_loss is not None or (norm is not None and not torch.isfinite(norm))
        diverged = trainer.strategy.reduce_boolean_decision(local, all=False)
        bad_loss, self._bad_loss = self._bad_loss, None
        if not diverged:
            return
        what = (
            f"loss {bad_loss}"
            if bad_loss is not None
            else f"gradient norm {float(norm) if norm is not None else '?'}"
        )
        if self.skipped < self.max_skips:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients
            module.log("train/skipped_steps", float(self.skipped))
            print(
                f"step {trainer.global_step}: non-finite {what}; step skipped "
                f"({self.skipped} of trainer.skip_nonfinite_steps={self.max_skips})"
            )
            return
        config = module.config
        raise NonFiniteError(
            f"training diverged at step {trainer.global_step}: non-finite {what} (on this or another "
            f"rank). Nothing of this state is saved; resume=last restarts from the last good checkpoint. "
            f"Likely causes: the learning rate (optim.lr={config.optim.lr}), the precision "
            f"(trainer.precision={config.trainer.precision}), no or loose gradient clipping "
            f"(optim.grad_clip={config.optim.grad_clip}). To ride through rare spikes instead: "
            f"trainer.skip_nonfinite_steps=N."
        )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict["skipped"]


class CheckpointOnException(L.Callback):
    """Writes `path` when a run stops on an exception, where that is safe: a preemption (every
    rank stops at the same step) or a single process. An error on one rank of many would leave
    the others waiting in the save's barrier, and a diverged state is never saved.

    Not Lightning's OnExceptionCheckpoint: with it, `fit(ckpt_path=None)` silently restores the
    previous on-exception checkpoint, so a fresh run (resume=null) in the same folder resumed."""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteError):
            return  # the state diverged: saving it would make resume=last pick it
        if isinstance(exception, SIGTERMException) or trainer.world_size == 1:
            trainer.save_checkpoint(self.path)
