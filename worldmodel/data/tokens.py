"""Token shards: a prepared video folder encoded once by a frozen tokenizer (`worldmodel tokenize`),
so that every dynamics run and every size of a sweep trains from tokens instead of re-running
the tokenizer on every clip of every step.

The tokenizer's encoder attends causally over the frames of a window (relative positions), so
a frame's tokens depend on the window they were encoded in. A token sample therefore holds, for
one stored clip, the tokens of every window the loader can draw from it (each start; `frames`
frames taken every `stride`): `tokens.npy` (starts, frames, h, w), in the smallest integer type
that holds the vocabulary. The loader picks the window with the same randomness as from video,
so a run from tokens trains on exactly the tokens a run from video computes. That costs one
encoding per start: `hop` > 1 keeps every hop-th start only, when a dataset is too large for it.
Beside the tokens: `actions.npy` (the clip's actions, as in the video shard), with `--lam` the
latent actions a frozen latent action model reads off each window (`latent_actions.npy`
(starts, frames): the window's transitions, then the null action, as a dynamics run on latent
actions computes them from video), and a json with the source key, shard and position, the stored
frame count, the window and checksums.

One token shard per video shard, same name. A shard is written to a temporary file and renamed
when complete, after its record (`.NAME.json`: clips written, clips skipped by cause), so an
interrupted run, started again, redoes only the shards without a file and gives byte-identical
shards. `tokenize.json` names the tokenizer and window a folder is being made with; another
tokenizer, latent action model or window is refused there. `dataset.json` comes last, as with `prepare`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from worldmodel.data.pipeline import (
    SKIP_CAUSES,
    WORKER_CONTEXT,
    BadSample,
    ClipSpec,
    decode_sample,
    sample_metadata,
)
from worldmodel.data.processes import exit_with
from worldmodel.data.shards import (
    INDEX_NAME,
    SPLITS,
    TOKENS_FORMAT,
    checksum,
    file_digest,
    npy_bytes,
    read_index,
    write_json_atomic,
)
from worldmodel.models.lam import latent_conditioning

log = logging.getLogger("worldmodel.data")

MANIFEST_NAME = "tokenize.json"


def network_identity(network: torch.nn.Module) -> str:
    """A hash of a frozen network's architecture and weights (buffers included): equal exactly
    when it encodes (a tokenizer) or labels (a latent action model) alike."""
    digest = hashlib.sha256(json.dumps(asdict(network.config), sort_keys=True).encode())
    for name, value in sorted(network.state_dict().items()):
        array = value.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {vocab_size} codes does not fit 32 bits")


@dataclass(frozen=True)
class TokenizeJob:
    """What every process needs to tokenize shards: the same for all of them."""

    checkpoint: str
    weights: str
    lam_checkpoint: str | None  # also label every window with this latent action model
    spec: ClipSpec  # the windows encoded: frames, stride; the video's size and action set
    hop: int  # frames between the starts of encoded windows (1: every window the loader can draw)
    batch_size: int
    out_dir: str


# Each process loads the networks once, for every shard it takes (tokenize_shard).
_tokenizer = None
_lam = None
_device = torch.device("cpu")


def _use(tokenizer, lam, device: str) -> None:
    global _tokenizer, _lam, _device
    _device = torch.device(device)
    _tokenizer = tokenizer.to(_device)
    _lam = lam.to(_device) if lam is not None else None


def _device_for(slot: int) -> str:
    return f"cuda:{slot % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _start_pool_process(job: TokenizeJob, slots, devices: int, owner: int) -> None:
    """Pool initializer: take the next free slot, so each process gets its own GPU; end with the
    process that runs the pool, even one killed outright (`exit_with`)."""
    from worldmodel.training.checkpoint import load_lam, load_tokenizer

    exit_with(owner)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    lam = load_lam(job.lam_checkpoint) if job.lam_checkpoint else None
    _use(load_tokenizer(job.checkpoint, job.weights), lam, _device_for(slots.get()))


def clip_windows(video: np.ndarray, spec: ClipSpec, hop: int) -> np.ndarray:
    """The windows a token sample holds: video (S, H, W, 3) uint8 -> (starts, frames, H, W, 3)."""
    starts = spec.window_starts(len(video), hop)
    return np.stack([video[start : start + spec.span : spec.stride] for start in starts])


def batched(network_call, windows: np.ndarray, batch_size: int, device) -> np.ndarray:
    """`network_call` over windows (starts, frames, H, W, 3), `batch_size` at a time, concatenated."""
    outputs = [
        network_call(torch.from_numpy(windows[first : first + batch_size]).to(device)).cpu()
        for first in range(0, len(windows), batch_size)
    ]
    return torch.cat(outputs).numpy()


def tokenize_shard(job: TokenizeJob, url: str) -> dict:
    """Encode one video shard into the token shard of the same name; returns its record."""
    out_dir, name = Path(job.out_dir), Path(url).name
    dtype = token_dtype(_tokenizer.vocab_size)
    record = {"name": name, "clips": 0, "skipped": dict.fromkeys(SKIP_CAUSES, 0)}
    errors = []
    samples = wds.tarfile_to_samples(handler=lambda error: errors.append(error) or True)([{"url": url}])
    # Named by process: a process of a killed run may still be writing its own.
    temporary = out_dir / f".{name}.{os.getpid()}.partial"
    with wds.TarWriter(str(temporary), mtime=0) as writer:
        for position, sample in enumerate(samples):
            try:
                clip = _whole_clip(sample, job.spec)
            except BadSample as bad:
                record["skipped"][bad.cause] += 1
                log.warning("skipping %s in %s (%s: %s)", sample.get("__key__"), url, bad.cause, bad.detail)
                continue
            windows = clip_windows(clip["video"], job.spec, job.hop)  # (starts, frames, H, W, 3)
            tokens = batched(_tokenizer.encode, windows, job.batch_size, _device)  # (starts, frames, h, w)
            payload = {"tokens.npy": npy_bytes(tokens.astype(dtype))}
            if _lam is not None:  # as a run on latent actions reads them off a window: ids, then null
                latent = batched(partial(latent_conditioning, _lam), windows, job.batch_size, _device)
                payload["latent_actions.npy"] = npy_bytes(latent.astype(np.int16))  # (starts, frames)
            if "actions.npy" in sample:
                payload["actions.npy"] = sample["actions.npy"]
            writer.write(
                {
                    "__key__": clip["key"],
                    **payload,
                    "json": {
                        "source": clip["source"],
                        "source_key": clip["key"],
                        "source_shard": name,
                        "position": position,  # the clip's index in its source shard
                        "frames": len(clip["video"]),  # stored frames, all decoded
                        "window": {"frames": job.spec.frames, "stride": job.spec.stride, "hop": job.hop},
                        "checksums": {member: checksum(data) for member, data in payload.items()},
                    },
                }
            )
            record["clips"] += 1
    record["skipped"]["tar"] += len(errors)
    for error in errors[:3]:
        log.warning("unreadable part of %s (%s: %s)", url, type(error).__name__, error)
    write_json_atomic(out_dir / f".{name}.json", record)  # before the shard: a shard has its record
    os.replace(temporary, out_dir / name)
    return record


def _whole_clip(sample: dict, spec: ClipSpec) -> dict:
    """Every stored frame of a video sample, checked as the loader checks it."""
    _, stored = sample_metadata(sample)
    if stored < spec.span:
        raise BadSample("video", f"{stored} frames, {spec.span} needed")
    return decode_sample(sample, ClipSpec(stored, 1, spec.height, spec.width, spec.num_actions), rng=None)


def tokenize(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    devices: int = 1,
    batch_size: int = 16,
    frames: int | None = None,
    stride: int | None = None,
    hop: int = 1,
    weights: str = "ema",
    lam_checkpoint: str | os.PathLike | None = None,
) -> dict:
    """Encode every shard of a prepared folder; returns the token folder's `dataset.json`.

    The window defaults to the clips the tokenizer was trained on (its checkpoint records them).
    `devices` processes (GPUs where there are, else CPU processes sharing the cores) take the
    shards one at a time. Started again after an interruption, it continues where it stopped.
    `hop` > 1 encodes only every hop-th window of a clip (hop-times less work and storage; the
    loader then draws among those, so runs no longer see the windows a video run would).
    `lam_checkpoint`: also store the latent actions this latent action model reads off every
    window, for dynamics runs on latent actions (task.action_source latent or both) from tokens."""
    from worldmodel.training.checkpoint import load_lam, read_stage_checkpoint, tokenizer_from

    source = read_index(data_dir)
    if source["format"] == TOKENS_FORMAT:
        raise ValueError(f"{data_dir} holds tokens already: give the prepared video folder they came from")
    stored, config = read_stage_checkpoint(checkpoint, "tokenizer")
    tokenizer = tokenizer_from(stored, config, weights)
    trained = stored.get("data") or {}
    spec = ClipSpec(
        frames=frames or trained.get("frames") or config["data"]["frames"],
        stride=stride or trained.get("stride") or config["data"]["stride"],
        height=source["height"],
        width=source["width"],
        num_actions=source["num_actions"],
    )
    if spec.span > source["frames_per_clip"]:
        raise ValueError(
            f"--frames {spec.frames} at stride {spec.stride} span {spec.span} frames, but clips in "
            f"{data_dir} have {source['frames_per_clip']}"
        )
    grid = [size // tokenizer.config.downsample for size in (source["height"], source["width"])]
    manifest = {
        "format": TOKENS_FORMAT,
        "source": str(Path(data_dir).resolve()),
        "tokenizer": {
            "identity": network_identity(tokenizer),
            "checkpoint": str(Path(checkpoint).resolve()),
            "weights": weights,
            "config": asdict(tokenizer.config),
            "vocab_size": tokenizer.vocab_size,
        },
        "window": {"frames": spec.frames, "stride": spec.stride, "hop": hop},
        "grid": grid,
        "dtype": token_dtype(tokenizer.vocab_size).name,
    }
    lam = load_lam(lam_checkpoint) if lam_checkpoint else None
    if lam is not None:
        manifest["lam"] = {
            "identity": network_identity(lam),
            "checkpoint": str(Path(lam_checkpoint).resolve()),
            "num_latents": lam.num_latents,
        }
    out = Path(out_dir)
    _claim(out, manifest)
    lam_path = str(lam_checkpoint) if lam_checkpoint else None
    job = TokenizeJob(str(checkpoint), weights, lam_path, spec, hop, batch_size, str(out))
    todo = [
        (str(Path(data_dir) / shard["name"]), shard["clips"])
        for split in SPLITS
        for shard in source["splits"][split]["shards"]
        if not (out / shard["name"]).is_file()
    ]
    total = sum(split["clips"] for split in source["splits"].values())
    done = total - sum(clips for _, clips in todo)
    with tqdm(total=total, initial=done, unit="clip", desc="tokenize") as progress:
        if devices == 1:
            _use(tokenizer, lam, _device_for(0))
            for url, clips in todo:
                tokenize_shard(job, url)
                progress.update(clips)
        else:
            slots = WORKER_CONTEXT.Queue()  # handed to each pool process as it starts
            for slot in range(devices):
                slots.put(slot)
            setup = (job, slots, devices, os.getpid())
            with ProcessPoolExecutor(
                devices, WORKER_CONTEXT, initializer=_start_pool_process, initargs=setup
            ) as pool:
                running = {pool.submit(tokenize_shard, job, url): clips for url, clips in todo}
                for finished in as_completed(running):
                    finished.result()
                    progress.update(running[finished])
    return _write_index(out, source, manifest)


def _claim(out: Path, manifest: dict) -> None:
    """Start a token folder, or continue one being made with the same tokenizer and window."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != manifest:
            differ = sorted(key for key in manifest if previous.get(key) != manifest[key])
            raise ValueError(
                f"{out} holds tokens made with another {', '.join(differ)} (see {path}): "
                f"choose another --out, or delete that folder to start over"
            )
        for leftover in out.glob(".*.partial"):  # shards an interrupted run did not finish
            leftover.unlink(missing_ok=True)
        return
    (out / INDEX_NAME).unlink(missing_ok=True)
    write_json_atomic(path, manifest)


def _write_index(out: Path, source: dict, manifest: dict) -> dict:
    """`dataset.json` of the finished token folder, from the shards' records."""
    index = {"format": TOKENS_FORMAT}
    index.update({key: source[key] for key in ("frames_per_clip", "height", "width", "fps", "num_actions")})
    index["source"] = {**source.get("source", {}), "video": manifest["source"]}
    index.update(
        {key: manifest[key] for key in ("tokenizer", "lam", "window", "grid", "dtype") if key in manifest}
    )
    index["splits"], skipped = {}, dict.fromkeys(SKIP_CAUSES, 0)
    for split in SPLITS:
        shards = []
        for shard in source["splits"][split]["shards"]:
            record = json.loads((out / f".{shard['name']}.json").read_text())
            for cause, count in record["skipped"].items():
                skipped[cause] += count
            if record["clips"]:
                digest = file_digest(out / shard["name"])
                shards.append({"name": shard["name"], "clips": record["clips"], **digest})
        index["splits"][split] = {"clips": sum(shard["clips"] for shard in shards), "shards": shards}
    index["skipped"] = skipped
    write_json_atomic(out / INDEX_NAME, index)
    return index


def tokenizer_for_tokens(index: dict, root: str, checkpoint: str | None = None):
    """The tokenizer that made a token folder's tokens (it decodes them for previews and travels
    in the dynamics checkpoints): the given checkpoint, which must be that tokenizer, or without
    one the checkpoint the folder records."""
    from worldmodel.config import ConfigError
    from worldmodel.training.checkpoint import load_tokenizer

    recorded = index["tokenizer"]
    path = checkpoint or recorded["checkpoint"]
    if not Path(path).exists():
        raise ConfigError(
            f"task.tokenizer_checkpoint: the tokens in {root} were made by {path}, which does not exist "
            f"here; set task.tokenizer_checkpoint to a copy of it"
        )
    tokenizer = load_tokenizer(path, recorded["weights"])
    _require_maker(tokenizer, recorded, path, root, "tokenizer", "made the tokens")
    return tokenizer


def lam_for_tokens(index: dict, root: str, checkpoint: str):
    """The latent action model `checkpoint` (task.lam_checkpoint), which must be the one that
    labelled a token folder's windows (`worldmodel tokenize --lam`): it travels in the dynamics
    checkpoint and conditions eval's rollouts as it conditioned training."""
    from worldmodel.config import ConfigError
    from worldmodel.training.checkpoint import load_lam

    recorded = index.get("lam")
    if recorded is None:
        raise ConfigError(
            f"task.action_source: the tokens in {root} hold no latent actions; tokenize with "
            f"`worldmodel tokenize ... --lam {checkpoint}`, or train on the video folder "
            f"{index['source']['video']}"
        )
    lam = load_lam(checkpoint)
    _require_maker(lam, recorded, checkpoint, root, "lam", "labelled the tokens")
    return lam


def _require_maker(network, recorded: dict, path, root: str, setting: str, did: str) -> None:
    from worldmodel.config import ConfigError

    identity = network_identity(network)
    if identity != recorded["identity"]:
        raise ConfigError(
            f"task.{setting}_checkpoint: {path} ({setting} {identity[:19]}) is not the {setting} that "
            f"{did} in {root} ({recorded['checkpoint']}, {setting} {recorded['identity'][:19]}): "
            f"point task.{setting}_checkpoint at that one, or tokenize again with this one"
        )
