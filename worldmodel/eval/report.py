"""`worldmodel eval`: score checkpoints on held-out clips; write metrics.json, plots and videos.

Per checkpoint, in `out/<checkpoint name>/`: `metrics.json` (every metric per horizon step and
averaged, at horizons 1/4/8, and what was skipped and why), `metrics.png` (each metric against
the horizon, model vs copy-last-frame), `rollouts.mp4` (truth | prediction for a few clips) and
`rollouts.png` (the same clips as still rows: truth above prediction, horizon steps left to right).
With several checkpoints, `out/comparison.md` puts them side by side. A tokenizer checkpoint is
scored for reconstruction: PSNR and SSIM per frame, `reconstructions.mp4` / `.png`.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from worldmodel.data.pipeline import ClipSpec, ClipStream
from worldmodel.data.shards import read_index, shard_paths
from worldmodel.data.video import encode_mp4
from worldmodel.eval.metrics import psnr, ssim
from worldmodel.eval.rollout import RolloutSettings, score_batch, world_model_from
from worldmodel.training.checkpoint import CheckpointError, read_stage_checkpoint, tokenizer_from

REPORTED_HORIZONS = (1, 4, 8)
VIDEO_CLIPS = 4


class EvalError(ValueError):
    """Data or settings a checkpoint cannot be evaluated with; the message names the mismatch."""


def check_compatible(trained_on: dict, num_actions: int, index: dict, settings: RolloutSettings, data: Path):
    needed = settings.context + settings.horizon
    if settings.context < 1:
        raise EvalError(f"--context must be >= 1, got {settings.context}")
    if needed > index["frames_per_clip"]:
        raise EvalError(
            f"--context {settings.context} + --horizon {settings.horizon} = {needed} frames, but clips in "
            f"{data} have {index['frames_per_clip']}: lower --horizon"
        )
    if trained_on.get("height") and (trained_on["height"], trained_on["width"]) != (
        index["height"],
        index["width"],
    ):
        raise EvalError(
            f"{data} holds {index['height']}x{index['width']} clips; the model was trained on "
            f"{trained_on['height']}x{trained_on['width']}"
        )
    data_actions = index["num_actions"] or 0
    if data_actions > num_actions:
        raise EvalError(
            f"{data} has {data_actions} actions; the model knows {num_actions}: another action space"
        )


def held_out_batches(data: Path, index: dict, frames: int, clips: int, batch_size: int):
    """Batches of `clips` held-out clips spread evenly over the val split (every k-th clip), so a
    split written game by game or video by video is scored across all of them."""
    stride = max(1, index["splits"]["val"]["clips"] // clips)
    stream = ClipStream(shard_paths(data, "val"), ClipSpec(frames), batch_size=1, train=False)
    chosen = itertools.islice(itertools.islice(stream, 0, None, stride), clips)
    while group := list(itertools.islice(chosen, batch_size)):
        yield {
            "video": torch.cat([sample["video"] for sample in group]),  # (b, T, H, W, 3)
            "actions": torch.cat([sample["actions"] for sample in group]),  # (b, T)
            "key": [key for sample in group for key in sample["key"]],
        }


def evaluate_checkpoint(
    path: str | os.PathLike,
    data: str | os.PathLike,
    settings: RolloutSettings,
    clips: int,
    out: Path,
    batch_size: int,
    i3d=None,
    lpips=None,
) -> dict:
    data = Path(data)
    index = read_index(data)
    checkpoint, config = read_stage_checkpoint(path)
    if config["task"]["stage"] == "tokenizer":
        check_compatible(checkpoint.get("data") or {}, index["num_actions"] or 0, index, settings, data)
        return evaluate_tokenizer(tokenizer_from(checkpoint, config), path, data, index, settings, clips, out)
    model = world_model_from(checkpoint, config, path)
    del checkpoint
    check_compatible(model.trained_on, model.num_actions, index, settings, data)
    per_clip: dict[str, list[torch.Tensor]] = {}
    frames_for_video = []
    real_clips, generated_clips = [], []  # whole clips (context + horizon), for FVD
    progress = tqdm(total=clips, unit="clip", desc=f"eval {Path(path).name}")
    for batch in held_out_batches(data, index, settings.context + settings.horizon, clips, batch_size):
        scores, predicted = score_batch(model, batch, settings, lpips)
        for name, values in scores.items():
            per_clip.setdefault(name, []).append(values)
        span = batch["video"][:, : settings.context + settings.horizon]
        real_clips.append(span)
        generated_clips.append(torch.cat([span[:, : settings.context], predicted], dim=1))
        if len(frames_for_video) < VIDEO_CLIPS:
            truth = batch["video"][:, settings.context : settings.context + settings.horizon]
            frames_for_video.extend(torch.cat([truth, predicted], dim=3))  # each (horizon, H, 2W, 3)
        progress.update(len(batch["key"]))
    progress.close()
    if not per_clip:
        raise EvalError(f"{data} has no validation clips")
    report = summarize({name: torch.cat(values) for name, values in per_clip.items()}, settings)
    report["checkpoint"] = str(path)
    report["folder"] = str(out)
    report["fvd"] = video_distance(i3d, torch.cat(real_clips), torch.cat(generated_clips))
    if lpips is None:
        report["lpips"] = {"skipped": "no LPIPS weights given (--lpips FILE; see worldmodel/eval/lpips.py)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "metrics.png")
    save_clips(frames_for_video[:VIDEO_CLIPS], out, "rollouts", index["fps"])
    return report


def save_clips(clips: list[torch.Tensor], out: Path, stem: str, fps: float, scale: int = 2) -> None:
    """`stem.mp4` with the clips stacked vertically, and `stem.png`, a still of each clip: a row
    of true frames over a row of model frames. `clips`: uint8 (T, H, 2W, 3), truth | model."""
    import matplotlib.pyplot as plt

    clips = [clip.numpy() for clip in clips]
    (out / f"{stem}.mp4").write_bytes(encode_mp4(np.concatenate(clips, axis=1), fps=fps))
    rows = []
    for clip in clips:
        width = clip.shape[2] // 2
        for half in (clip[:, :, :width], clip[:, :, width:]):  # truth, then prediction
            rows.append(np.concatenate(list(half), axis=1))  # frames left to right: (H, horizon * W, 3)
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))  # white gap between clips
    image = np.concatenate(rows[:-1], axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(out / f"{stem}.png", image)


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer, path, data: Path, index: dict, settings: RolloutSettings, clips: int, out: Path
):
    """Reconstruction of held-out clips (context + horizon frames): PSNR and SSIM per frame."""
    frames = settings.context + settings.horizon
    per_clip: dict[str, list[torch.Tensor]] = {"tokenizer_psnr": [], "tokenizer_ssim": []}
    frames_for_video = []
    progress = tqdm(total=clips, unit="clip", desc=f"eval {Path(path).name}")
    for batch in held_out_batches(data, index, frames, clips, batch_size=4):
        video = batch["video"]  # (B, frames, H, W, 3)
        reconstruction = tokenizer.decode(tokenizer.encode(video))
        per_clip["tokenizer_psnr"].append(psnr(reconstruction, video))
        per_clip["tokenizer_ssim"].append(ssim(reconstruction, video))
        if len(frames_for_video) < VIDEO_CLIPS:
            frames_for_video.extend(torch.cat([video, reconstruction], dim=3))  # each (frames, H, 2W, 3)
        progress.update(len(batch["key"]))
    progress.close()
    if not per_clip["tokenizer_psnr"]:
        raise EvalError(f"{data} has no validation clips")
    per_frame = {name: torch.cat(values).mean(dim=0).tolist() for name, values in per_clip.items()}
    report = {
        "stage": "tokenizer",
        "clips": sum(len(values) for values in per_clip["tokenizer_psnr"]),
        "frames": frames,
        "per_frame": per_frame,
        "mean": {name: float(np.mean(values)) for name, values in per_frame.items()},
        "checkpoint": str(path),
        "folder": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    save_clips(frames_for_video[:VIDEO_CLIPS], out, "reconstructions", index["fps"])
    return report


def video_distance(i3d, real: torch.Tensor, generated: torch.Tensor) -> dict:
    """FVD of context + rollout against the real clips, or why it was skipped."""
    from worldmodel.eval.i3d import MIN_FRAMES, fvd

    if i3d is None:
        return {
            "skipped": "no I3D weights given (--i3d FILE; see worldmodel/eval/i3d.py for where to get them)"
        }
    if real.shape[1] < MIN_FRAMES:
        return {"skipped": f"clips of {real.shape[1]} frames; I3D needs at least {MIN_FRAMES}"}
    if len(real) < 2:
        return {"skipped": "FVD needs at least 2 clips"}
    return {"value": fvd(i3d, real, generated), "clips": len(real), "frames": real.shape[1]}


def summarize(per_clip: dict[str, torch.Tensor], settings: RolloutSettings) -> dict:
    """Per-step means (over clips), overall means, and values at the reported horizons."""
    per_step = {name: values.mean(dim=0).tolist() for name, values in per_clip.items()}
    return {
        "clips": len(next(iter(per_clip.values()))),
        "context": settings.context,
        "horizon": settings.horizon,
        "per_step": per_step,
        "mean": {name: float(np.mean(values)) for name, values in per_step.items()},
        "at_horizon": {
            str(h): {name: values[h - 1] for name, values in per_step.items()}
            for h in REPORTED_HORIZONS
            if h <= settings.horizon
        },
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = report["per_step"]
    steps = np.arange(1, report["horizon"] + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (
        ("model_psnr", "model"),
        ("copy_last_psnr", "copy last frame"),
        ("tokenizer_psnr", "tokenizer (ceiling)"),
        ("random_action_psnr", "random actions"),
    ):
        if name in per_step:
            left.plot(steps, per_step[name], marker="o", label=label)
    left.set(xlabel="horizon step", ylabel="PSNR (dB)", title="PSNR")
    for name, label in (("model_ssim", "model"), ("copy_last_ssim", "copy last frame")):
        right.plot(steps, per_step[name], marker="o", label=label)
    right.set(xlabel="horizon step", ylabel="SSIM", title="SSIM")
    for axes in (left, right):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compare(reports: list[dict], path: Path) -> str:
    """A markdown table of the checkpoints' headline numbers."""
    columns = ["model_psnr", "copy_last_psnr", "model_ssim", "tokenizer_psnr", "delta_t_psnr", "fvd"]
    lines = [
        "| checkpoint | " + " | ".join(f"{c} (mean)" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for report in reports:
        values = {**report["mean"], "fvd": report.get("fvd", {}).get("value")}
        cells = [f"{values[c]:.3f}" if values.get(c) is not None else "-" for c in columns]
        lines.append(f"| {report['checkpoint']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def evaluate(
    checkpoints: list[str],
    data: str,
    settings: RolloutSettings,
    clips: int,
    out: str,
    batch_size: int = 4,
    i3d_weights: str | None = None,
    lpips_weights: str | None = None,
    wandb_mode: str | None = None,
):
    """Evaluate each checkpoint; `wandb_mode` ("offline" or "online") also logs the results to wandb."""
    from worldmodel.eval.i3d import load_i3d
    from worldmodel.eval.lpips import load_lpips

    out = Path(out)
    i3d = load_i3d(i3d_weights) if i3d_weights else None
    lpips = load_lpips(lpips_weights) if lpips_weights else None
    reports = []
    for checkpoint in checkpoints:
        if not Path(checkpoint).exists():
            raise CheckpointError(f"{checkpoint}: no such checkpoint")
        name = (
            Path(checkpoint).name
            if len(checkpoints) == 1
            else f"{len(reports)}_{Path(checkpoint).parent.parent.name}"
        )
        reports.append(
            evaluate_checkpoint(checkpoint, data, settings, clips, out / name, batch_size, i3d, lpips)
        )
    if len(reports) > 1:
        print(compare(reports, out / "comparison.md"))
    if wandb_mode:
        log_to_wandb(reports, out, wandb_mode)
    return reports


def log_to_wandb(reports: list[dict], out: Path, mode: str) -> None:
    import wandb

    run = wandb.init(project="worldmodel", job_type="eval", dir=str(out), mode=mode, name=f"eval-{out.name}")
    for report in reports:
        folder = Path(report["folder"])
        media = {f"{folder.name}/{name}": value for name, value in report["mean"].items()}
        if (folder / "metrics.png").exists():
            media[f"{folder.name}/metrics"] = wandb.Image(str(folder / "metrics.png"))
        for video in ("rollouts", "reconstructions"):
            if (folder / f"{video}.mp4").exists():
                media[f"{folder.name}/{video}"] = wandb.Video(str(folder / f"{video}.mp4"), format="mp4")
        run.log(media)
    run.finish()
