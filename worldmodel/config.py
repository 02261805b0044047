"""Typed configuration schemas. Each field is documented where it is declared and checked on
creation, so a wrong value fails at startup with the field's name, not an hour into a run.

OmegaConf builds structured configs from these classes, so a wrong type fails on assignment too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass
class DataConfig:
    """Where clips come from and how they are batched."""

    root: str | None = "data/shards/sample"  # a folder made by `worldmodel prepare`
    train_shards: list[str] | None = None  # brace patterns / URLs instead of root's train split
    val_shards: list[str] | None = None  # likewise for validation
    frames: int = 16  # frames per training clip (T)
    stride: int = 1  # take every stride-th stored frame
    fps: float | None = None  # sample at this rate instead (stride from dataset.json, or per sample)
    global_batch_size: int = 8  # clips per optimizer step, summed over devices and accumulation
    micro_batch_size: int | None = None  # clips per device per forward; None = global / world
    num_workers: int = 2  # decoding processes per rank
    batches_per_epoch: int = 100  # training batches per rank per epoch (streams are resampled)
    shuffle_buffer: int = 256  # samples held for shuffling, per worker
    seed: int = 0  # seeds shard choice, shuffling and clip starts
    max_skip_fraction: float = 0.01  # stop when more than this fraction of samples is unreadable
    num_actions: int | None = None  # the action set's size; read from dataset.json with data.root,
    #                                 required with data.train_shards when the samples carry actions
    # Shards of other tools (whole videos, any size and rate; worldmodel/data/foreign.py):
    size: int | None = None  # required for them: short side resized to this, centre-cropped
    caption_field: str | None = None  # the json field with the caption (default: the txt member)
    video_member: str | None = None  # a video member besides mp4, webm, mkv, avi, mov

    def __post_init__(self) -> None:
        _require(
            self.root is not None or self.train_shards is not None,
            "data.root",
            "set a prepared folder (data.root) or shard URLs (data.train_shards)",
        )
        _require(
            self.train_shards is None or self.val_shards is not None or self.root is not None,
            "data.val_shards",
            "set validation shard URLs too when data.train_shards replaces data.root",
        )
        _require(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
        for name in ("frames", "stride", "global_batch_size", "batches_per_epoch", "shuffle_buffer"):
            _require(getattr(self, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.fps is None or self.fps > 0, "data.fps", f"must be > 0, got {self.fps}")
        _require(self.size is None or self.size >= 8, "data.size", f"must be >= 8, got {self.size}")
        _require(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            "data.micro_batch_size",
            f"must be >= 1, got {self.micro_batch_size}",
        )
        _require(
            0.0 <= self.max_skip_fraction < 1.0,
            "data.max_skip_fraction",
            f"must be in [0, 1), got {self.max_skip_fraction}",
        )


def derive_batch(
    global_batch_size: int, world_size: int, micro_batch_size: int | None = None
) -> tuple[int, int]:
    """Per-device micro batch and gradient accumulation steps from the global batch size.

    global = micro * world_size * accumulation must hold exactly; otherwise the error says
    which numbers to change.
    """
    if micro_batch_size is None:
        _require(
            global_batch_size % world_size == 0,
            "data.global_batch_size",
            f"{global_batch_size} does not divide over {world_size} devices; use a multiple of {world_size}",
        )
        return global_batch_size // world_size, 1
    per_step = micro_batch_size * world_size
    _require(
        global_batch_size % per_step == 0,
        "data.global_batch_size",
        f"{global_batch_size} is not a multiple of micro_batch_size {micro_batch_size} x "
        f"{world_size} devices = {per_step}",
    )
    return micro_batch_size, global_batch_size // per_step


STAGES = ("tokenizer", "lam", "dynamics")
ACTION_SOURCES = ("true", "latent", "both")
STRATEGY_NAMES = ("ddp", "deepspeed", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


@dataclass
class ModelConfig:
    """Which network: a preset name from worldmodel/models/presets.py (architecture lives in code)."""

    preset: str = "tokenizer_debug"
    checkpointing: bool = False  # recompute each ST block's activations in backward
    action_conditioning: str | None = None  # dynamics: token | add | adaln instead of the preset's

    def __post_init__(self) -> None:
        from worldmodel.models.dynamics import CONDITIONINGS
        from worldmodel.models.presets import all_presets

        known = all_presets()
        _require(self.preset in known, "model.preset", f"unknown {self.preset!r}; one of {sorted(known)}")
        _require(
            self.action_conditioning in (None, *CONDITIONINGS),
            "model.action_conditioning",
            f"null or one of {CONDITIONINGS}, got {self.action_conditioning!r}",
        )


@dataclass
class TaskConfig:
    """Which stage to train."""

    stage: str = "tokenizer"  # tokenizer | lam (latent actions) | dynamics
    tokenizer_checkpoint: str | None = None  # dynamics: a trained tokenizer (file or DeepSpeed folder)
    # dynamics: what conditions it: the data's actions (true), the latent actions a frozen latent
    # action model (lam_checkpoint, trained with task=lam) reads off each transition (latent), or
    # both, one id per (true, latent) pair
    action_source: str = "true"
    lam_checkpoint: str | None = None
    context_frames: int = 2  # dynamics rollout videos: real frames given before generating
    maskgit_steps: int = 4  # dynamics: decoding iterations per frame (rollout videos, rollout_context)
    # dynamics: masked frames attend to clean earlier frames, as in generation (teacher forcing,
    # twice the frames per step); false: to earlier frames masked like themselves (Genie)
    clean_context: bool = True
    context_noise: float = 0.0  # dynamics: up to this fraction of context tokens made random
    # dynamics: the share of training clips whose actions are all hidden (the null action), so
    # the model also learns the action-free prediction that guidance (eval --guidance) pushes from
    action_dropout: float = 0.0
    # dynamics: the share of training clips whose context, past its first few frames, is the
    # model's own greedy rollout (maskgit_steps steps) rather than the truth (scheduled sampling)
    rollout_context: float = 0.0
    # lam: the share of training clips (chosen by their keys, the same ones every epoch) whose
    # recorded actions also teach the latent actions, through a linear probe; 0: frames alone
    labelled_share: float = 0.0
    # lam: of the probe's cross-entropy, against the next-frame error's 1. That error is a few
    # thousandths (pixels in [-1, 1]): at 1 the labels steer the encoder, at 0.01 they barely did
    # (README "Latent actions")
    label_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.stage in STAGES, "task.stage", f"must be one of {STAGES}, got {self.stage!r}")
        _require(
            self.action_source in ACTION_SOURCES,
            "task.action_source",
            f"must be one of {ACTION_SOURCES}, got {self.action_source!r}",
        )
        _require(
            self.action_source == "true" or self.lam_checkpoint is not None,
            "task.lam_checkpoint",
            f"task.action_source={self.action_source} needs a latent action model (train task=lam first)",
        )
        _require(
            0.0 <= self.context_noise < 1.0,
            "task.context_noise",
            f"must be in [0, 1), got {self.context_noise}",
        )
        _require(
            0.0 <= self.action_dropout < 1.0,
            "task.action_dropout",
            f"must be in [0, 1), got {self.action_dropout}",
        )
        _require(
            0.0 <= self.rollout_context <= 1.0,
            "task.rollout_context",
            f"must be in [0, 1], got {self.rollout_context}",
        )
        _require(
            self.clean_context or self.rollout_context == 0.0,
            "task.rollout_context",
            "rollouts replace clean context: set task.clean_context=true or rollout_context=0",
        )
        _require(
            0.0 <= self.labelled_share <= 1.0,
            "task.labelled_share",
            f"must be in [0, 1], got {self.labelled_share}",
        )
        _require(
            self.stage == "lam" or self.labelled_share == 0.0,
            "task.labelled_share",
            f"labels teach a latent action model (task=lam), not stage {self.stage}: set it to 0",
        )
        _require(self.label_weight >= 0, "task.label_weight", f"must be >= 0, got {self.label_weight}")
        _require(
            self.clean_context or self.context_noise == 0.0,
            "task.context_noise",
            "noise applies to clean context: set task.clean_context=true or context_noise=0",
        )
        for name in ("tokenizer_checkpoint", "lam_checkpoint"):
            path = getattr(self, name)
            if self.stage == "dynamics" and path is not None:
                _require(Path(path).exists(), f"task.{name}", f"{path} does not exist")


@dataclass
class OptimConfig:
    """AdamW with warmup and cosine decay."""

    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.05  # on matrices only; norms, biases and embeddings are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at schedule_steps
    schedule_steps: int | None = None  # length of the cosine; None = trainer.max_steps
    grad_clip: float = 1.0  # global norm; 0 disables
    ema_decay: float | None = None  # keep an exponential moving average of the weights

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(
            self.schedule_steps is None or self.schedule_steps >= 1,
            "optim.schedule_steps",
            f"must be >= 1 or null, got {self.schedule_steps}",
        )
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _require(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "optim.ema_decay",
            f"must be in (0, 1) or null, got {self.ema_decay}",
        )


@dataclass
class TrainerConfig:
    """Hardware, precision, length of the run and how often things happen."""

    accelerator: str = "cpu"  # cpu | gpu
    devices: int = 1  # processes (GPUs) per node
    num_nodes: int = 1
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true | 16-mixed
    max_steps: int = 1000  # optimizer steps
    log_every_n_steps: int = 10
    val_every_n_steps: int = 200
    limit_val_batches: int = 10
    checkpoint_every_n_steps: int = 200
    video_every_n_steps: int = 500  # 0 disables reconstruction / rollout videos
    compile: bool = False  # torch.compile the network
    fast_dev_run: bool = False  # one batch of training and validation, nothing written
    overfit_batches: int = 0  # train and validate on this many batches only
    limit_train_batches: int | None = None  # cap batches per epoch
    profiler: str | None = None  # simple | advanced | pytorch
    peak_tflops: float | None = None  # per-device peak for MFU; None = table (GPU) / measured (CPU)
    skip_nonfinite_steps: int = 0  # skip up to N optimizer steps with a non-finite loss or gradient
    signal_grace_s: float = 180.0  # after SIGTERM/USR1/USR2, exit this long later if no step ends

    def __post_init__(self) -> None:
        _require(
            self.accelerator in ("cpu", "gpu"), "trainer.accelerator", f"cpu or gpu, got {self.accelerator!r}"
        )
        _require(
            self.precision in PRECISIONS, "trainer.precision", f"one of {PRECISIONS}, got {self.precision!r}"
        )
        for name in ("devices", "num_nodes", "max_steps", "log_every_n_steps", "val_every_n_steps"):
            _require(getattr(self, name) >= 1, f"trainer.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in (
            "checkpoint_every_n_steps",
            "video_every_n_steps",
            "overfit_batches",
            "limit_val_batches",
            "skip_nonfinite_steps",
        ):
            _require(getattr(self, name) >= 0, f"trainer.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(self.signal_grace_s > 0, "trainer.signal_grace_s", f"must be > 0, got {self.signal_grace_s}")
        _require(
            self.profiler in (None, "simple", "advanced", "pytorch"),
            "trainer.profiler",
            f"simple, advanced, pytorch or null, got {self.profiler!r}",
        )
        _require(
            not (self.accelerator == "cpu" and self.precision == "16-mixed"),
            "trainer.precision",
            "16-mixed needs a GPU; use 32-true or bf16-mixed on CPU",
        )

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class StrategyConfig:
    """How the model is spread over devices (applied from outside the model)."""

    name: str = "ddp"  # ddp | deepspeed | fsdp
    zero_stage: int = 2  # deepspeed: 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer states in CPU memory (DeepSpeedCPUAdam)
    offload_parameters: bool = False  # deepspeed stage 3: parameters in CPU memory
    bucket_elements: int = 50_000_000  # deepspeed: elements per communication bucket (memory vs overlap)
    persistence_threshold: int = 100_000  # zero 3: tensors of fewer elements stay whole on every rank
    # zero 3: at most this many gathered parameter elements alive at once, and a gathered
    # parameter is kept (not released and regathered) when it is used again within this many
    # elements; DeepSpeed's defaults (1e9 each) keep a model of up to 1e9 parameters gathered whole
    live_parameters: int = 1_000_000_000
    reuse_distance: int = 1_000_000_000
    # zero 3: the optimizer steps its shard in groups of this many elements; every temporary of
    # the step (flattened gradients, Adam's intermediates) is the size of one group
    sub_group_elements: int = 1_000_000_000
    reduce_dtype: str = "fp32"  # fsdp: gradients are averaged across ranks in fp32 | bf16

    def __post_init__(self) -> None:
        _require(self.name in STRATEGY_NAMES, "strategy.name", f"one of {STRATEGY_NAMES}, got {self.name!r}")
        _require(self.zero_stage in (1, 2, 3), "strategy.zero_stage", f"1, 2 or 3, got {self.zero_stage}")
        _require(
            self.bucket_elements >= 1, "strategy.bucket_elements", f"must be >= 1, got {self.bucket_elements}"
        )
        for name in ("live_parameters", "reuse_distance", "sub_group_elements"):
            _require(getattr(self, name) >= 0, f"strategy.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(
            self.persistence_threshold >= 0,
            "strategy.persistence_threshold",
            f"must be >= 0, got {self.persistence_threshold}",
        )
        _require(
            self.reduce_dtype in ("fp32", "bf16"),
            "strategy.reduce_dtype",
            f"fp32 or bf16, got {self.reduce_dtype!r}",
        )
        _require(
            not self.offload_parameters or self.zero_stage == 3,
            "strategy.offload_parameters",
            "parameter offload needs zero_stage 3",
        )


BUDGETS = ("tokens_per_parameter", "flops")


@dataclass
class ScalingConfig:
    """A compute budget that sets trainer.max_steps from the model's size (experiment=scaling)."""

    budget: str | None = None  # null: trainer.max_steps as given | tokens_per_parameter | flops
    tokens_per_parameter: float = 20.0  # training tokens per parameter (20: Chinchilla's optimum)
    flops: float | None = None  # training FLOPs per run, the same for every size

    def __post_init__(self) -> None:
        _require(
            self.budget is None or self.budget in BUDGETS,
            "scaling.budget",
            f"null or one of {BUDGETS}, got {self.budget!r}",
        )
        _require(self.tokens_per_parameter > 0, "scaling.tokens_per_parameter", "must be > 0")
        if self.budget == "flops":
            _require(
                self.flops is not None and self.flops > 0, "scaling.flops", "set it (> 0) for budget=flops"
            )


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv
    project: str = "worldmodel"
    mode: str = "offline"  # wandb: offline (no account needed) | online
    name: str | None = None  # run name; defaults to the run folder's name

    def __post_init__(self) -> None:
        _require(self.kind in ("wandb", "csv"), "logger.kind", f"wandb or csv, got {self.kind!r}")
        _require(self.mode in ("offline", "online"), "logger.mode", f"offline or online, got {self.mode!r}")


@dataclass
class TrainConfig:
    """Everything a run needs; composed by Hydra, checked here, stored in every checkpoint."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run_dir: str = "outputs/run"  # checkpoints/, logs and media land here
    resume: str | None = None  # last | a checkpoint path | null
    seed: int = 0

    def __post_init__(self) -> None:
        stage_of_preset = self.model.preset.split("_")[0]
        _require(
            stage_of_preset == self.task.stage,
            "model.preset",
            f"{self.model.preset} is a {stage_of_preset} preset but task.stage is {self.task.stage}; "
            f"pick model={self.task.stage}_...",
        )
        derive_batch(self.data.global_batch_size, self.trainer.world_size, self.data.micro_batch_size)
        _require(
            self.task.stage != "dynamics"
            or self.task.tokenizer_checkpoint is not None
            or _holds_tokens(self.data.root),
            "task.tokenizer_checkpoint",
            "the dynamics stage needs a trained tokenizer checkpoint (train task=tokenizer first), "
            "or token shards that name theirs (data=tokens data.root=DIR from `worldmodel tokenize`)",
        )
        _require(
            self.optim.ema_decay is None
            or self.strategy.name == "ddp"
            or (self.strategy.name == "deepspeed" and self.strategy.zero_stage < 3),
            "optim.ema_decay",
            "EMA needs whole weights on every rank: use ddp or deepspeed zero_stage 1/2 (not fsdp)",
        )
        _require(
            not self.trainer.skip_nonfinite_steps or self.strategy.name != "deepspeed",
            "trainer.skip_nonfinite_steps",
            "DeepSpeed's engine owns the gradients and cannot skip a step: use strategy=ddp or 0 (stop)",
        )


def _holds_tokens(root: str | None) -> bool:
    """Whether `root` is a folder of token shards (its dataset.json says so)."""
    from worldmodel.data.shards import TOKENS_FORMAT, read_index

    try:
        return bool(root) and read_index(root)["format"] == TOKENS_FORMAT
    except (FileNotFoundError, ValueError):
        return False  # the data module reports a missing or broken index


def register_schema() -> None:
    """Make TrainConfig the base of Hydra's composition (`- train_schema` in configs/train.yaml):
    every field can be overridden without `+`, and a wrong type fails while composing."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_schema()
