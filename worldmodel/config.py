"""Typed configuration schemas. Each field is documented where it is declared and checked on
creation, so a wrong value fails at startup with the field's name, not an hour into a run.

Optional fields are spelled `Optional[...]`: OmegaConf builds structured configs from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass
class DataConfig:
    """Where clips come from and how they are batched."""

    root: Optional[str] = "data/shards/sample"  # noqa: UP045 - a folder made by `worldmodel prepare`
    train_shards: Optional[list[str]] = None  # noqa: UP045 - brace patterns / URLs instead of root's train split
    val_shards: Optional[list[str]] = None  # noqa: UP045 - likewise for validation
    frames: int = 16  # frames per training clip (T)
    stride: int = 1  # take every stride-th stored frame
    fps: Optional[float] = None  # noqa: UP045 - sample at this rate instead (derives stride from dataset.json)
    global_batch_size: int = 8  # clips per optimizer step, summed over devices and accumulation
    micro_batch_size: Optional[int] = None  # noqa: UP045 - clips per device per forward; None = global / world
    num_workers: int = 2  # decoding processes per rank
    batches_per_epoch: int = 100  # training batches per rank per epoch (streams are resampled)
    shuffle_buffer: int = 256  # samples held for shuffling, per worker
    seed: int = 0  # seeds shard choice, shuffling and clip starts
    max_skip_fraction: float = 0.01  # stop when more than this fraction of samples is unreadable

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
