"""The streaming loader: shards -> samples -> decoded clips -> batches, resumable and robust.

Training streams are resampled: each (rank, worker) draws shards at random, forever, from its
own part of the shard list, shuffles samples in a buffer, and stops after a fixed number of
batches, so every rank sees the same number of batches per epoch. All randomness comes from
(seed, epoch, rank, worker, position), which makes the stream a pure function of where it is:
a restored position skips the samples already used (reading but not decoding them) and the
run continues with exactly the batches an uninterrupted run would have seen.

Validation streams read every sample once, in shard order, sample i going to the (rank, worker)
whose index is i modulo their number.

Bad samples (unreadable tar members, a missing or malformed json, a member that does not match
its checksum, an undecodable or short video, unreadable tokens, actions that do not match the
frames) are skipped, logged with key and shard, and counted (the first few logged one by one,
then summarised); the run stops with a message naming the causes when the skipped fraction passes
`max_skip_fraction`, judged at every batch and, in each worker, as samples are read (once a
minimum was read), so all-bad shards stop the run too.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from worldmodel.data import NULL_ACTION
from worldmodel.data.foreign import ForeignVideoError, foreign_clip, video_member
from worldmodel.data.processes import exit_with
from worldmodel.data.shards import checksum
from worldmodel.data.video import VideoDecodeError, decode_mp4, resize_short_side_center_crop

log = logging.getLogger("worldmodel.data")

# Loader workers fork from a server process that has imported this module (torch, webdataset,
# decord) and nothing else: they start fast and small (see ClipLoader.__iter__).
WORKER_CONTEXT = multiprocessing.get_context("forkserver")
WORKER_CONTEXT.set_forkserver_preload([__name__])


# The signals that start_worker_server made the loader's helpers deaf to (see there).
_WORKERS_DEAF_TO: tuple[int, ...] = ()


def start_worker_server(deaf_to: tuple[int, ...]) -> None:
    """Start the workers' forkserver (and the resource tracker it needs) ignoring the signals
    `deaf_to`. A scheduler signals every process of a job (SLURM's SIGUSR1 before the limit,
    submitit's SIGUSR2, SIGTERM), and these helpers must outlive it while the main process
    finishes its step and checkpoints: by default SIGUSR1/2 kill them, and the main process then
    fails at a random point with "DataLoader worker exited unexpectedly". An ignored signal stays
    ignored across fork and exec, so the server, the tracker and every worker forked later ignore
    these; the workers still end with the main process (`exit_with`).
    Except SIGTERM: each torch worker installs its own SIGTERM handler when it starts (dying
    unless its parent sent it), so `_start_loader_worker` ignores these signals again in every worker."""
    global _WORKERS_DEAF_TO
    _WORKERS_DEAF_TO = tuple(deaf_to)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in deaf_to}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start_loader_worker(signums: tuple[int, ...], owner: int, worker_id: int) -> None:
    """A loader worker's init (it runs after torch armed its signal handlers): ignore `signums`
    again, and end with the process whose loader this is. A worker killed by a job-wide SIGTERM
    while handing a batch over made the main process fail (ConnectionResetError) before it could
    checkpoint: seen in a preemption test."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
    exit_with(owner)


SKIP_CAUSES = ("tar", "json", "corrupt", "video", "tokens", "actions")


class BadSample(Exception):
    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail = cause, detail


class TooManyBadSamples(RuntimeError):
    """More of the stream was unreadable than the configured limit allows."""


@dataclass(frozen=True)
class ClipSpec:
    """What one sample becomes: `frames` frames taken every `stride` frames of a stored clip."""

    frames: int
    stride: int = 1
    height: int | None = None  # when set, clips of another size are skipped as bad
    width: int | None = None
    num_actions: int | None = None  # when set, clips with action ids outside it are skipped as bad
    # Videos of other tools (data/foreign.py), read only when `size` is set:
    size: int | None = None  # short side resized to this, centre-cropped to a square
    fps: float | None = None  # frames at this rate (else every `stride`-th): shard URLs, whose
    #                           prepared clips' json or other tools' containers give the stored rate
    caption_field: str | None = None  # the json field with the caption (else the txt member)
    video_member: str | None = None  # a video member name besides mp4, webm, mkv, avi, mov

    @property
    def span(self) -> int:
        """Stored frames covered by one sampled clip."""
        return (self.frames - 1) * self.stride + 1

    def window_starts(self, stored_frames: int, hop: int = 1) -> range:
        """First frames of the windows a clip of `stored_frames` offers: every start (hop 1), or
        every hop-th, as a token sample holds them (data/tokens.py)."""
        return range(0, stored_frames - self.span + 1, hop)


def decode_sample(sample: dict, spec: ClipSpec, rng: np.random.Generator | None) -> dict:
    """Turn a raw WebDataset sample into {key, video (T,H,W,3) uint8 | tokens (T,h,w), actions
    (T,) int64, source, text}: a video sample is decoded, a token sample (`worldmodel tokenize`)
    gives the tokens of the same window, and with `spec.size` a video of another tool's shard
    is cut, resized and cropped (data/foreign.py).

    `rng` picks a random start (training); without it the clip starts at frame 0.
    Raises BadSample naming the cause.
    """
    if spec.size is not None and is_foreign(sample, spec):
        try:
            return foreign_clip(sample, spec, rng)
        except ForeignVideoError as error:
            raise BadSample(error.cause, error.detail) from error
    meta, stored_frames = sample_metadata(sample)
    verify_checksums(sample, meta)
    cause = "tokens" if "tokens.npy" in sample else "video"
    if spec.fps and cause == "video" and meta.get("fps"):  # shard URLs: the rate its json records
        spec = replace(spec, stride=max(1, round(float(meta["fps"]) / spec.fps)))
    if stored_frames < spec.span:
        raise BadSample(cause, f"{stored_frames} frames, {spec.span} needed")
    # Windows start every frame of a video; token samples hold those every `hop` frames.
    hop = _token_window(meta, spec)["hop"] if cause == "tokens" else 1
    starts = spec.window_starts(stored_frames, hop)
    choice = int(rng.integers(len(starts))) if rng is not None else 0
    indices = list(range(starts[choice], starts[choice] + spec.span, spec.stride))
    if cause == "tokens":
        clip = {"tokens": _window(sample, "tokens.npy", choice, len(starts), spec, ndim=4)}  # (T, h, w)
        if "latent_actions.npy" in sample:  # `worldmodel tokenize --lam`: labelled per window
            clip["latent_actions"] = _window(sample, "latent_actions.npy", choice, len(starts), spec, ndim=2)
    else:
        clip = {"video": _video(sample, indices, stored_frames, spec)}
    clip["actions"] = _actions(sample, indices, stored_frames, spec)
    source = str(meta.get("source", ""))  # e.g. "atari/Boxing": eval reports each source apart
    return {"key": sample["__key__"], **clip, "source": source, "text": str(meta.get("caption") or "")}


def is_foreign(sample: dict, spec: ClipSpec) -> bool:
    """A video sample not prepared by worldmodel: a video member, and no json of ours (with its
    stored frame count)."""
    if "tokens.npy" in sample or video_member(sample, spec.video_member) is None:
        return False
    try:
        return "frames" not in json.loads(sample.get("json") or b"{}")
    except (ValueError, TypeError, AttributeError):
        return True


def sample_metadata(sample: dict) -> tuple[dict, int]:
    """A sample's json and the number of frames stored in it; BadSample "json" when unusable."""
    if "json" not in sample:
        raise BadSample("json", "no json member")
    try:
        meta = json.loads(sample["json"])
        return meta, int(meta["frames"])
    except (ValueError, TypeError, KeyError) as error:
        raise BadSample("json", f"malformed metadata ({type(error).__name__}: {error})") from error


def _video(sample: dict, indices: list[int], stored_frames: int, spec: ClipSpec) -> np.ndarray:
    if not sample.get("mp4"):
        raise BadSample("video", "no or empty mp4 member")
    try:
        video = decode_mp4(sample["mp4"], indices, stored_frames)
    except VideoDecodeError as error:
        raise BadSample("video", str(error)) from error
    if spec.height is not None and video.shape[1:3] != (spec.height, spec.width):
        raise BadSample("video", f"size {video.shape[1:3]}, expected {(spec.height, spec.width)}")
    if spec.size is not None and video.shape[1:3] != (spec.size, spec.size):  # mixed with foreign
        video = np.stack([resize_short_side_center_crop(frame, spec.size) for frame in video])
    return video


def _token_window(meta: dict, spec: ClipSpec) -> dict:
    """The windows a token sample holds ({frames, stride, hop}); they must be the run's."""
    window = meta.get("window")
    wanted = (spec.frames, spec.stride)
    if not isinstance(window, dict) or (window.get("frames"), window.get("stride")) != wanted:
        raise BadSample("tokens", f"windows {window} encoded, the run reads {wanted} (frames, stride)")
    return {"hop": 1, **window}


def _window(sample: dict, member: str, choice: int, starts: int, spec: ClipSpec, ndim: int) -> np.ndarray:
    """Window number `choice` of a token sample's `member` (data/tokens.py: the sample holds every
    window): tokens.npy (starts, frames, h, w) or latent_actions.npy (starts, frames)."""
    try:
        array = np.load(io.BytesIO(sample[member]), allow_pickle=False)
    except ValueError as error:
        raise BadSample("tokens", f"unreadable {member} ({error})") from error
    if (
        array.ndim != ndim
        or array.shape[:2] != (starts, spec.frames)
        or not np.issubdtype(array.dtype, np.integer)
    ):
        raise BadSample(
            "tokens", f"{member} {array.dtype}{array.shape}, expected ({starts}, {spec.frames}, ...)"
        )
    return array[choice].astype(np.int64)


def _actions(sample: dict, indices: list[int], stored_frames: int, spec: ClipSpec) -> np.ndarray:
    if "actions.npy" not in sample:
        return np.full(len(indices), NULL_ACTION, dtype=np.int64)
    try:
        actions = np.load(io.BytesIO(sample["actions.npy"]), allow_pickle=False)
    except ValueError as error:
        raise BadSample("actions", f"unreadable actions.npy ({error})") from error
    if actions.shape != (stored_frames,) or not np.issubdtype(actions.dtype, np.integer):
        raise BadSample("actions", f"actions {actions.dtype}{actions.shape}, expected int ({stored_frames},)")
    actions = actions[indices].astype(np.int64)
    if spec.num_actions is not None and ((actions < NULL_ACTION) | (actions >= spec.num_actions)).any():
        raise BadSample(
            "actions", f"action ids {actions.min()}..{actions.max()} outside [0, {spec.num_actions})"
        )
    return actions


_warned_unchecked = False


def verify_checksums(sample: dict, meta: dict) -> None:
    """Every member the json has a checksum for must match it (BadSample "corrupt"); samples
    prepared without checksums pass, with one warning per process."""
    global _warned_unchecked
    expected = meta.get("checksums")
    if expected is None:
        if not _warned_unchecked:
            _warned_unchecked = True
            log.warning(
                "%s has no checksums (prepared by an older worldmodel): damaged clips cannot be "
                "detected; prepare the data again to get them",
                sample.get("__url__"),
            )
        return
    for member, value in expected.items():
        if member in sample and checksum(sample[member]) != value:
            raise BadSample("corrupt", f"{member} does not match its checksum {value}")


@dataclass
class WorkerProgress:
    """How far one (logical) worker got in the current epoch: reported with every batch."""

    worker: int
    position: int = 0  # raw samples taken from the shuffled stream so far
    seen: int = 0  # samples decoded or rejected
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_CAUSES, 0))
    last_skip: dict[str, str] = field(default_factory=dict)  # cause -> "key in shard: detail"

    def __post_init__(self) -> None:
        # Positions saved before a cause existed lack its count.
        self.skipped = {**dict.fromkeys(SKIP_CAUSES, 0), **self.skipped}

    def skip(self, cause: str, where: str, detail: str) -> None:
        self.skipped[cause] += 1
        self.last_skip[cause] = f"{where}: {detail}"
        count = self.skipped[cause]
        if count <= 3:
            log.warning("skipping %s (%s: %s)", where, cause, detail)
        elif count in (10, 100) or count % 1000 == 0:  # summarised, not one line per sample
            log.warning(
                "%d samples skipped for %s by worker %d so far; the last: %s",
                count,
                cause,
                self.worker,
                self.last_skip[cause],
            )

    def copy(self) -> WorkerProgress:
        return WorkerProgress(self.worker, self.position, self.seen, dict(self.skipped), dict(self.last_skip))


@dataclass
class ResumePoint:
    """Where iteration starts: handed to the workers with the dataset."""

    epoch: int = 0
    consumed: int = 0  # batches of this epoch already used
    progress: dict[int, WorkerProgress] = field(default_factory=dict)  # by logical worker


class ClipStream(IterableDataset):
    """Batches of clips from WebDataset shards, for one rank; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        spec: ClipSpec,
        batch_size: int,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        batches_per_epoch: int = 100,
    ):
        if not urls:
            raise ValueError("no shards to read")
        self.urls = list(urls)
        self.spec = spec
        self.batch_size = batch_size
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.resume = ResumePoint()
        self.limit = SkipLimit()  # the loader sets its own

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = info.num_workers if info else 1
        physical = info.id if info else 0
        # After a resume mid-epoch the DataLoader starts again at physical worker 0, while
        # the next batch is due from logical worker `consumed % n_workers`: rotate the roles.
        logical = (physical + self.resume.consumed) % n_workers
        progress = self.resume.progress.get(logical, WorkerProgress(logical)).copy()
        # Streams are numbered across ranks: rank r's worker w is stream r * workers + w.
        stream_id, n_streams = self.rank * n_workers + logical, self.world_size * n_workers
        if self.train:
            return self._train_batches(logical, n_workers, stream_id, n_streams, progress)
        return self._val_batches(stream_id, n_streams, progress)

    def _tar_samples(self, urls, progress: WorkerProgress, reading: _ReadState) -> Iterator[dict]:
        def on_error(error: Exception) -> bool:
            reading.errors += 1
            # A resumed stream meets again, in the same order, the errors it counted before.
            if reading.counts_tar_errors and reading.errors > reading.errors_counted_before:
                progress.skip("tar", "shard", f"{type(error).__name__}: {error}")
            return True  # keep reading the next member / shard

        def counted(samples: Iterator[dict]) -> Iterator[dict]:
            for sample in samples:
                reading.samples += 1
                yield sample

        return counted(wds.tarfile_to_samples(handler=on_error)({"url": url} for url in urls))

    def _train_batches(
        self, worker: int, n_workers: int, stream_id: int, n_streams: int, progress: WorkerProgress
    ) -> Iterator[dict]:
        epoch = self.resume.epoch
        # Each stream resamples from its own slice of the shards when there are enough of them.
        pool = self.urls[stream_id::n_streams] if len(self.urls) >= n_streams else self.urls
        shard_rng = random.Random(f"shards-{self.seed}-{epoch}-{stream_id}")
        resume_at = progress.position
        reading = _ReadState(errors_counted_before=progress.skipped["tar"])
        samples = self._tar_samples(_resampled(pool, shard_rng, reading), progress, reading)
        shuffle_rng = random.Random(f"shuffle-{self.seed}-{epoch}-{stream_id}")
        samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng)(samples)

        due = range(worker, self.batches_per_epoch, n_workers)  # this worker's batch indices
        remaining = sum(1 for index in due if index >= self.resume.consumed)
        batch: list[dict] = []
        if remaining == 0:
            return
        for position, sample in enumerate(samples):
            if position < resume_at:
                continue  # used before the checkpoint: read, not decoded
            progress.position = position + 1
            start_rng = np.random.default_rng([self.seed, epoch, stream_id, position])
            clip = self._decode_or_skip(sample, start_rng, progress)
            if clip is not None:
                batch.append(clip)
            if len(batch) == self.batch_size:
                yield _collate(batch, progress)
                batch, remaining = [], remaining - 1
                if remaining == 0:
                    return

    def _val_batches(self, stream_id: int, n_streams: int, progress: WorkerProgress) -> Iterator[dict]:
        # A full batch is held back until the next one fills, so the last batch handed out
        # carries the counts of everything read, shard errors after the last sample included.
        batch: list[dict] = []
        held: list[dict] = []
        reading = _ReadState(counts_tar_errors=stream_id == 0)  # every stream reads every shard
        for index, sample in enumerate(self._tar_samples(self.urls, progress, reading)):
            if index % n_streams != stream_id:
                continue
            progress.position = index + 1
            clip = self._decode_or_skip(sample, None, progress)
            if clip is not None:
                batch.append(clip)
            if len(batch) == self.batch_size:
                if held:
                    yield _collate(held, progress)
                held, batch = batch, []
        for last in (held, batch):
            if last:
                yield _collate(last, progress)

    def _decode_or_skip(self, sample: dict, rng, progress: WorkerProgress) -> dict | None:
        progress.seen += 1
        try:
            return decode_sample(sample, self.spec, rng)
        except BadSample as bad:
            where = f"{sample.get('__key__')} in {sample.get('__url__')}"
            progress.skip(bad.cause, where, bad.detail)
            # Judged here too, as samples are read: a stream whose samples are all bad never
            # yields a batch, so the loader's judgement at each batch would never come.
            error = skip_limit_error([progress], self.limit)
            if error is not None:
                raise error from None
            return None


@dataclass
class _ReadState:
    samples: int = 0  # samples read from tars so far
    errors: int = 0  # tar read errors met so far
    errors_counted_before: int = 0  # of those, how many a resumed stream already counted
    counts_tar_errors: bool = True


def _resampled(pool: list[str], rng: random.Random, reading: _ReadState) -> Iterator[str]:
    """Shard URLs drawn with replacement, forever; fails if shards stop yielding samples."""
    stalled, last_count = 0, reading.samples
    while True:
        yield rng.choice(pool)
        stalled = stalled + 1 if reading.samples == last_count else 0
        last_count = reading.samples
        if stalled > 4 * len(pool) + 16:
            raise TooManyBadSamples(f"{stalled} shards in a row gave no readable sample: {pool[:3]}...")


@dataclass(frozen=True)
class SkipLimit:
    """Stop when more than `fraction` of the samples read are bad, once `min_seen` were read."""

    fraction: float = 0.01
    min_seen: int = 200


def skip_limit_error(
    progress: list[WorkerProgress], limit: SkipLimit, epoch: int | None = None
) -> TooManyBadSamples | None:
    """The error naming the causes when the workers' skipped share passes the limit, else None."""
    seen = sum(p.seen for p in progress)
    skipped = dict.fromkeys(SKIP_CAUSES, 0)
    for worker in progress:
        for cause, count in worker.skipped.items():
            skipped[cause] += count
    if not seen or seen < limit.min_seen or sum(skipped.values()) / seen <= limit.fraction:
        return None
    examples = {cause: where for worker in progress for cause, where in worker.last_skip.items()}
    causes = ", ".join(f"{cause}: {n}" for cause, n in skipped.items() if n)
    when = f" in epoch {epoch}" if epoch is not None else ""
    return TooManyBadSamples(
        f"{sum(skipped.values())} of {seen} samples skipped ({sum(skipped.values()) / seen:.1%} > limit "
        f"{limit.fraction:.1%}){when}; by cause: {causes}; last of each: {examples}. "
        f"Fix or remove the shards, or raise max_skip_fraction."
    )


def _collate(clips: list[dict], progress: WorkerProgress) -> dict:
    # video (B, T, H, W, 3) uint8, or tokens (B, T, h, w) int64 from token shards, with their
    # latent actions (B, T) int64 where they were labelled
    payloads = [name for name in ("video", "tokens", "latent_actions") if name in clips[0]]
    return {
        **{name: torch.from_numpy(np.stack([c[name] for c in clips])) for name in payloads},
        "actions": torch.from_numpy(np.stack([c["actions"] for c in clips])),  # (B, T) int64
        "key": [c["key"] for c in clips],
        "source": [c["source"] for c in clips],
        "text": [c.get("text", "") for c in clips],  # captions, where the samples have them
        "stream": vars(progress.copy()),  # plain data, so device transfer leaves it alone
    }


class ClipLoader:
    """Iterates a ClipStream through a DataLoader and keeps its position as checkpointable state.

    `state_dict()` describes the batches consumed so far. By default a batch counts as consumed
    when it is handed out; a training loop that prefetches can pass `auto_consume=False` and
    call `mark_consumed(batch)` after each step instead. `repeat_epoch=True` replays epoch 0
    every time (overfitting a few batches on purpose).
    """

    def __init__(
        self,
        stream: ClipStream,
        num_workers: int = 0,
        max_skip_fraction: float = 0.01,
        min_samples_for_check: int = 200,
        auto_consume: bool = True,
        repeat_epoch: bool = False,
        agree=None,
        pin_memory: bool = False,
    ):
        self.stream = stream
        self.agree = agree
        self.pin_memory = pin_memory
        self.num_workers = num_workers
        self.max_skip_fraction = max_skip_fraction
        self.min_samples_for_check = min_samples_for_check
        stream.limit = SkipLimit(max_skip_fraction, min_samples_for_check)
        self.auto_consume = auto_consume
        self.repeat_epoch = repeat_epoch
        self._point = ResumePoint()
        self._epoch_started = False

    def __len__(self) -> int:
        if not self.stream.train:
            raise TypeError("a validation stream has no fixed length")
        return self.stream.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if self._epoch_started and self.stream.train:
            self._point = ResumePoint(epoch=0 if self.repeat_epoch else self._point.epoch + 1)
        self._epoch_started = True
        if not self.stream.train:
            self._point = ResumePoint()
        self.stream.resume = self._point
        loader = DataLoader(
            self.stream,
            batch_size=None,  # the stream batches in the worker
            num_workers=self.num_workers,
            persistent_workers=False,  # the resume point travels with each new iterator
            prefetch_factor=2 if self.num_workers else None,
            # Workers start each epoch; forked from a trainer that holds gigabytes of freed
            # activation memory, each reused it and copied it (6 GB per worker measured with
            # dynamics_xs). A forkserver forks them from a small, clean process instead.
            multiprocessing_context=WORKER_CONTEXT if self.num_workers else None,
            worker_init_fn=functools.partial(_start_loader_worker, _WORKERS_DEAF_TO, os.getpid()),
            # page-locked batches: the copy to a GPU runs asynchronously (Lightning moves
            # batches with non_blocking=True), overlapping the step before
            pin_memory=self.pin_memory,
        )
        for batch in self._agreed(loader):
            if self.auto_consume:
                self.mark_consumed(batch)
            yield batch
        self._check_skips(final=True)

    def _agreed(self, loader: DataLoader) -> Iterator[dict]:
        """With `agree` (several ranks), a batch is used only when every rank has one: each rank
        then runs the same number of batches (the few extra ones of some ranks are dropped), as
        collective forward passes (ZeRO-3, FSDP) need. `agree(has_batch)` is True when all have."""
        if self.agree is None:
            yield from loader
            return
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not self.agree(batch is not None):
                return
            yield batch

    def mark_consumed(self, batch: dict) -> None:
        progress = WorkerProgress(**batch["stream"])
        self._point.progress[progress.worker] = progress
        self._point.consumed += 1
        # Lightning stops after len() batches without exhausting the iterator: judge the epoch here.
        self._check_skips(final=self.stream.train and self._point.consumed == self.stream.batches_per_epoch)

    def end_epoch(self) -> None:
        """The training loop ended this epoch early: checkpoints now point at the next one."""
        self._point.consumed = max(self._point.consumed, self.stream.batches_per_epoch)

    @property
    def epoch(self) -> int:
        return self._point.epoch

    def skip_counts(self) -> dict[str, int]:
        totals = dict.fromkeys(SKIP_CAUSES, 0)
        for progress in self._point.progress.values():
            for cause, count in progress.skipped.items():
                totals[cause] += count
        return totals

    def _check_skips(self, final: bool) -> None:
        limit = SkipLimit(self.max_skip_fraction, 1 if final else self.min_samples_for_check)
        error = skip_limit_error(list(self._point.progress.values()), limit, self._point.epoch)
        if error is not None:
            raise error

    def state_dict(self) -> dict:
        return {
            "epoch": self._point.epoch,
            "consumed": self._point.consumed,
            "num_workers": max(1, self.num_workers),
            "world_size": self.stream.world_size,
            "stream": self._signature(),
            "progress": {w: vars(p.copy()) for w, p in self._point.progress.items()},
        }

    def _signature(self) -> dict:
        """What the positions depend on besides the layout: change any and they mean other samples."""
        stream = self.stream
        return {
            "seed": stream.seed,
            "batch_size": stream.batch_size,
            "shuffle_buffer": stream.shuffle_buffer,
            "batches_per_epoch": stream.batches_per_epoch,
            "shards": len(stream.urls),
        }

    def load_state_dict(self, state: dict) -> None:
        point = ResumePoint(epoch=state["epoch"])
        same_layout = (state["num_workers"], state["world_size"], state["stream"]) == (
            max(1, self.num_workers),
            self.stream.world_size,
            self._signature(),
        )
        if same_layout:
            point.consumed = state["consumed"]
            point.progress = {int(w): WorkerProgress(**p) for w, p in state["progress"].items()}
        else:
            log.warning(
                "data position saved with %s workers x %s ranks and %s, resuming with %s x %s and %s: "
                "epoch %s restarts from its first batch",
                state["num_workers"],
                state["world_size"],
                state["stream"],
                max(1, self.num_workers),
                self.stream.world_size,
                self._signature(),
                state["epoch"],
            )
        if state["consumed"] >= self.stream.batches_per_epoch:  # saved at the end of an epoch
            point = ResumePoint(epoch=point.epoch + 1)
        self._point = point
        self._epoch_started = False
