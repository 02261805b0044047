"""Checkpoints: where a run resumes from, reading them with or without DeepSpeed, exporting.

A checkpoint is a file (DDP, single device), a DeepSpeed folder (`checkpoint/` with model
states and one optimizer shard per rank) or an FSDP folder (torch.distributed.checkpoint's
`.metadata` and one `.distcp` file per rank, beside Lightning's `meta.pt` with everything but
the weights and optimizer states). All hold the resolved config under `hyper_parameters.config`,
and a dynamics checkpoint holds its tokenizer under `tokenizer` (and the latent action model
that labelled its transitions under `lam`). `read_checkpoint` consolidates
the sharded kinds on one CPU process, and `export` writes any kind as one plain file.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from worldmodel.models.lam import LatentActionConfig, LatentActionModel
from worldmodel.models.tokenizer import Tokenizer, TokenizerConfig

CHECKPOINT_DIR = "checkpoints"
FSDP_META = "meta.pt"  # in an FSDP checkpoint folder: Lightning's entries besides the shards


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind; the message names it."""


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> str | None:
    """`last` -> the run's checkpoint of the highest step recorded inside it (the newest file
    among equal steps), or None if there is none yet, so a requeued job that never saved starts
    fresh; a path -> that path, which must exist. Names alone mislead: a crash leaves
    `on_exception.ckpt`, a changed interval used to leave an old `last.ckpt`."""
    if resume is None:
        return None
    if resume == "last":
        folder = Path(run_dir) / CHECKPOINT_DIR
        candidates = list(folder.glob("*.ckpt"))
        if not (folder / "last.ckpt").exists() and (folder / "last.ckpt.previous").exists():
            candidates.append(folder / "last.ckpt.previous")  # a crash between the folder swap's renames
        ranked = [(recorded_step(path), path.stat().st_mtime, path) for path in candidates]
        return str(max(ranked)[2]) if ranked else None
    if not Path(resume).exists():
        raise CheckpointError(f"resume: {resume} does not exist (use resume=last or a checkpoint path)")
    return resume


def refuse_earlier_checkpoints(run_dir: str | os.PathLike) -> None:
    """A fresh run (no `resume`) must not start in a run_dir that holds another run's checkpoints:
    its first save would overwrite that run's `last.ckpt` and `stepN.ckpt` with a different
    run's, and `resume=last` would later mix the two. The message says how to go on."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    earlier = sorted(path.name for path in folder.glob("*.ckpt*")) if folder.is_dir() else []
    if earlier:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise CheckpointError(
            f"run_dir: {folder} already holds checkpoints of an earlier run ({shown}); continue it "
            "with resume=last, or start this run in another run_dir (or delete that folder)"
        )


def recorded_step(path: Path) -> int:
    """The optimizer step a checkpoint file or DeepSpeed folder records; -1 if unreadable."""
    try:
        return int(checkpoint_header(path)["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable checkpoint ranks last, loading it names the error
        return -1


def checkpoint_header(path: str | os.PathLike) -> dict:
    """A checkpoint's entries without reading its weights (memory-mapped); for a DeepSpeed
    folder, Lightning's client state in the model-states file (the step, config, net_config)."""
    path = Path(path)
    if (path / FSDP_META).is_file():
        path = path / FSDP_META
    elif path.is_dir():
        states = sorted(path.glob("*/mp_rank_00_model_states.pt"))
        if not states:
            raise CheckpointError(f"{path}: a folder without DeepSpeed model states or FSDP shards")
        path = states[0]
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from error


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's contents on CPU without its optimizer states (what evaluating, exporting
    or generating needs; a resume reads them through Lightning): a file is memory-mapped, so
    the states it holds are never read from disk; of an FSDP folder only the weights are
    gathered; a DeepSpeed folder's fp32 weights live in its optimizer shards, which are read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        if (path / FSDP_META).is_file():
            return _read_fsdp_folder(path)
        if path.is_dir():
            checkpoint = _read_deepspeed_folder(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        checkpoint.pop("optimizer_states", None)
        return checkpoint
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from error


def _read_deepspeed_folder(path: Path) -> dict:
    """Consolidate the ZeRO shards with Lightning's converter (rank 0's client state + fp32 weights)."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    if not (path / "latest").is_file():
        raise CheckpointError(f"{path}: a folder, but not a DeepSpeed checkpoint (no 'latest' file)")
    with tempfile.TemporaryDirectory() as scratch:
        consolidated = Path(scratch) / "consolidated.pt"
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints where it saves
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(consolidated))
        return torch.load(consolidated, map_location="cpu", weights_only=False)


def _read_fsdp_folder(path: Path) -> dict:
    """Lightning's `meta.pt` with the weights gathered from every rank's shard
    (torch.distributed.checkpoint, read without a process group; optimizer states left)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    checkpoint = torch.load(path / FSDP_META, map_location="cpu", weights_only=False)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is unavailable or uninitialized")
        states = _load_state_dict_from_keys({"state_dict"}, checkpoint_id=path)
    checkpoint["state_dict"] = states["state_dict"]
    return checkpoint


def checkpoint_config(checkpoint: dict, path: str | os.PathLike) -> dict:
    """The resolved training config a checkpoint was written with."""
    try:
        return checkpoint["hyper_parameters"]["config"]
    except KeyError as error:
        raise CheckpointError(
            f"{path}: holds no worldmodel config (not written by worldmodel train)"
        ) from error


WEIGHTS = ("ema", "raw")


def net_state_dict(checkpoint: dict, weights: str = "ema") -> dict:
    """The network's weights: the module's `net.*` entries without the prefix; with
    `weights="ema"`, the parameters' moving average where training kept one (`optim.ema_decay`),
    as every load (eval, generate, the dynamics stage's tokenizer) uses by default."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    state = {
        key.removeprefix("net."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("net.")
    }
    if weights == "ema" and checkpoint.get("ema"):
        state.update({name: value.to(state[name].dtype) for name, value in checkpoint["ema"].items()})
    return state


def read_stage_checkpoint(path: str | os.PathLike, stage: str | None = None) -> tuple[dict, dict]:
    """(checkpoint, its training config); with `stage`, the checkpoint must be of that stage."""
    checkpoint = read_checkpoint(path)
    config = checkpoint_config(checkpoint, path)
    if stage is not None and config["task"]["stage"] != stage:
        raise CheckpointError(
            f"{path}: a {config['task']['stage']} checkpoint; this needs a {stage} checkpoint"
        )
    return checkpoint, config


def load_tokenizer(path: str | os.PathLike, weights: str = "ema") -> Tokenizer:
    """A trained tokenizer from a tokenizer checkpoint (file, DeepSpeed folder or export)."""
    return tokenizer_from(*read_stage_checkpoint(path, "tokenizer"), weights)


def load_lam(path: str | os.PathLike, weights: str = "ema") -> LatentActionModel:
    """A trained latent action model from a lam checkpoint (file, DeepSpeed or FSDP folder, export)."""
    return lam_from(*read_stage_checkpoint(path, "lam"), weights)


def network_from(checkpoint: dict, config: dict, network: type, kind: type, weights: str = "ema"):
    """The `network` of a read checkpoint, in eval mode, built as trained (`kind`: its config class)."""
    net = network(recorded_net_config(checkpoint, config, kind))
    net.load_state_dict(net_state_dict(checkpoint, weights))
    return net.eval()


def tokenizer_from(checkpoint: dict, config: dict, weights: str = "ema") -> Tokenizer:
    return network_from(checkpoint, config, Tokenizer, TokenizerConfig, weights)


def lam_from(checkpoint: dict, config: dict, weights: str = "ema") -> LatentActionModel:
    return network_from(checkpoint, config, LatentActionModel, LatentActionConfig, weights)


def recorded_net_config(checkpoint: dict, config: dict, kind: type):
    """The architecture a checkpoint was trained with (`net_config`), never today's preset table;
    checkpoints written before they carried it fall back to the preset they name."""
    from worldmodel.models.presets import preset

    if "net_config" in checkpoint:
        return kind(**checkpoint["net_config"])
    return preset(config["model"]["preset"])


def export(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Consolidate a checkpoint (DeepSpeed or FSDP folder, or file) into one plain file."""
    checkpoint = read_checkpoint(path)
    config = checkpoint_config(checkpoint, path)
    exported = {
        "hyper_parameters": {"config": config},
        "state_dict": checkpoint["state_dict"],
        "global_step": checkpoint.get("global_step"),
    }
    for extra in ("ema", "tokenizer", "lam", "data", "net_config"):
        if extra in checkpoint:
            exported[extra] = checkpoint[extra]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(exported, partial)
    os.replace(partial, out)  # never a half-written export
    return out
