"""The LightningDataModule: a DataConfig in, resumable training and validation loaders out."""

from __future__ import annotations

import tarfile
from pathlib import Path

import lightning as L
import webdataset as wds

from worldmodel.config import ConfigError, DataConfig, derive_batch
from worldmodel.data.pipeline import ClipLoader, ClipSpec, ClipStream, is_foreign
from worldmodel.data.shards import TOKENS_FORMAT, read_index, shard_paths


def expand_shards(patterns: list[str]) -> list[str]:
    """Brace patterns and URLs (local paths, pipe:, http) to a flat list of shard URLs."""
    return [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]


class VideoDataModule(L.LightningDataModule):
    """Clips from prepared shards, or their tokens from token shards (`worldmodel tokenize`,
    batches with "tokens" instead of "video"); the per-device batch comes from the global batch
    size."""

    def __init__(
        self,
        config: DataConfig,
        rank: int | None = None,
        world_size: int | None = None,
        consume_on_yield: bool = True,
        repeat_epoch: bool = False,
    ):
        """`consume_on_yield=False` when a training loop prefetches: it then calls
        `train_loader.mark_consumed(batch)` for each batch it trains on (callbacks.DataPosition)."""
        super().__init__()
        self.config = config
        self.consume_on_yield = consume_on_yield
        self.repeat_epoch = repeat_epoch  # the same batches every epoch: for overfitting on purpose
        self._rank, self._world_size = rank, world_size
        # Shard URLs, when given, replace the prepared folder (and its dataset.json) entirely.
        self.index = read_index(config.root) if config.root and not config.train_shards else None
        self.tokens = self.index is not None and self.index["format"] == TOKENS_FORMAT
        self._num_actions = self._action_space()
        self.spec = self._clip_spec()
        if self.index is None and config.size is None:
            first = self._urls("train")[0]
            if is_foreign(first_sample(first), self.spec):
                raise ConfigError(
                    f"data.size: the samples of {first} are whole videos made by another tool (no "
                    f"worldmodel json): set data.size (e.g. 64) to resize and crop them, or convert the "
                    f"shards once with `worldmodel prepare shards`"
                )
        self.train_loader: ClipLoader | None = None

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return self.trainer.global_rank if self.trainer else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        return self.trainer.world_size if self.trainer else 1

    @property
    def micro_batch_size(self) -> int:
        return self.batch_plan[0]

    @property
    def batch_plan(self) -> tuple[int, int]:
        """(micro batch per device, gradient accumulation steps)."""
        cfg = self.config
        return derive_batch(cfg.global_batch_size, self.world_size, cfg.micro_batch_size)

    @property
    def num_actions(self) -> int | None:
        return self._num_actions

    def _action_space(self) -> int | None:
        """The action set's size: dataset.json's, or `data.num_actions` for shard URLs, which
        must be set when their samples carry actions (checked on the first training shard)."""
        stated = self.config.num_actions
        if self.index is not None:
            recorded = self.index["num_actions"]
            if stated is not None and stated != recorded:
                raise ConfigError(
                    f"data.num_actions: {stated}, but {self.config.root}/dataset.json records {recorded}"
                )
            return recorded
        if stated is None:
            first = self._urls("train")[0]
            if shard_has_actions(first):
                raise ConfigError(
                    f"data.num_actions: the samples of {first} carry actions; set data.num_actions "
                    f"to the size of their action set (e.g. 18 for Atari's full set)"
                )
        return stated

    def _clip_spec(self) -> ClipSpec:
        cfg, index = self.config, self.index
        stride = cfg.stride
        if cfg.fps is not None and index is not None:
            stride = round(index["fps"] / cfg.fps)
            if stride < 1 or abs(index["fps"] / stride - cfg.fps) > 0.05 * cfg.fps:
                raise ConfigError(f"data.fps: {cfg.fps} is not the stored {index['fps']} fps / an integer")
        spec = ClipSpec(
            frames=cfg.frames,
            stride=stride,
            height=index["height"] if index and not self.tokens else None,
            width=index["width"] if index and not self.tokens else None,
            num_actions=self._num_actions,
            size=cfg.size,
            fps=cfg.fps if index is None else None,  # shard URLs: foreign videos are read at this rate
            caption_field=cfg.caption_field,
            video_member=cfg.video_member,
        )
        window = index["window"] if self.tokens else None
        if window and (window["frames"], window["stride"]) != (spec.frames, spec.stride):
            raise ConfigError(
                f"data.frames: the token shards in {cfg.root} hold windows of {window['frames']} frames "
                f"at stride {window['stride']}, this run reads {spec.frames} at stride {spec.stride}: set "
                f"data.frames={window['frames']} data.stride={window['stride']}, or tokenize again "
                f"with --frames {spec.frames} --stride {spec.stride}"
            )
        if index and spec.span > index["frames_per_clip"]:
            raise ConfigError(
                f"data.frames: {cfg.frames} frames at stride {stride} span {spec.span} stored frames, "
                f"but clips in {cfg.root} have {index['frames_per_clip']}"
            )
        return spec

    def _urls(self, split: str) -> list[str]:
        patterns = self.config.train_shards if split == "train" else self.config.val_shards
        urls = expand_shards(patterns) if patterns else shard_paths(self.config.root, split)
        if not urls:
            field = f"data.{split}_shards" if patterns else "data.root"
            raise ConfigError(f"{field}: no {split} shards in {patterns or self.config.root}")
        return urls

    def _stream(self, split: str) -> ClipStream:
        cfg = self.config
        return ClipStream(
            self._urls(split),
            self.spec,
            self.micro_batch_size,
            train=split == "train",
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            batches_per_epoch=cfg.batches_per_epoch,
        )

    def train_dataloader(self) -> ClipLoader:
        cfg = self.config
        self.train_loader = ClipLoader(
            self._stream("train"),
            cfg.num_workers,
            cfg.max_skip_fraction,
            auto_consume=self.consume_on_yield,
            repeat_epoch=self.repeat_epoch,
            pin_memory=self.on_gpu,
        )
        return self.train_loader

    def val_dataloader(self) -> ClipLoader:
        cfg = self.config
        agree = None
        if self.trainer is not None and self.world_size > 1:
            # Sample i goes to stream i mod streams, so ranks can hold different numbers of
            # batches: every rank runs as many as the rank with the fewest.
            strategy = self.trainer.strategy
            agree = lambda has_batch: strategy.reduce_boolean_decision(has_batch, all=True)  # noqa: E731
        return ClipLoader(
            self._stream("val"), cfg.num_workers, cfg.max_skip_fraction, agree=agree, pin_memory=self.on_gpu
        )

    @property
    def on_gpu(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"


def first_sample(url: str) -> dict[str, bytes]:
    """The members of a local shard's first sample, by name after the key ({} for remote URLs,
    which are not opened here, and for unreadable shards, which the loader reports). Only the
    json is read; other members (a whole video can be large) stand as a placeholder."""
    path = Path(url.removeprefix("file:"))
    members: dict[str, bytes] = {}
    if not path.is_file():
        return members
    try:
        with tarfile.open(path) as archive:
            first_key = None
            for member in archive:
                key, _, name = member.name.partition(".")
                if first_key not in (None, key):
                    break
                first_key = key
                handle = archive.extractfile(member) if name == "json" else None
                members[name] = handle.read() if handle else b"(not read)"
    except (tarfile.TarError, OSError):
        return {}
    return members


def shard_has_actions(url: str) -> bool:
    """Whether the first sample of a local shard has an `actions.npy` member."""
    return "actions.npy" in first_sample(url)
